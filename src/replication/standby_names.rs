//! `synchronous_standby_names`: PostgreSQL's grammar, parsed and printed.
//!
//! ```text
//! FIRST num_sync ( standby_name [, ...] )   priority: the num_sync first in the list
//! ANY num_sync ( standby_name [, ...] )     quorum: any num_sync of them
//! num_sync ( standby_name [, ...] )         the same as FIRST
//! standby_name [, ...]                      the same as FIRST 1 ( ... )
//! ''                                        no synchronous standbys
//! ```
//!
//! This follows `syncrep_gram.y` and `syncrep_scanner.l` token for token:
//!
//! - `ANY` and `FIRST` are keywords in any case; the longest match wins, so
//!   `anybody` and `first2` are names. A standby called `any` or `first` must
//!   be double-quoted.
//! - A name is an identifier (`[A-Za-z_\x80-\xff][A-Za-z_0-9$\x80-\xff]*`:
//!   every byte of a multi-byte UTF-8 character counts as a letter), a
//!   number (`FIRST 1 (1, 2)` names standbys "1" and "2"), `*`, or a
//!   double-quoted identifier in which `""` stands for one `"`.
//! - Names are **not** case-folded, quoted or not: the scanner keeps the
//!   text as written, and `SyncRepGetStandbyPriority` compares it with the
//!   standby's `application_name` ignoring ASCII case (`pg_strcasecmp`). So
//!   quoting protects keywords and odd characters, never case. `*` (quoted
//!   or not) matches every standby.
//! - The empty string means no synchronous standbys; a string of blanks is a
//!   syntax error, as in PostgreSQL.
//!
//! Where walden differs, on purpose: a syntax error names the character
//! position too, and a quoted name is shown whole in it (PostgreSQL shows
//! only the closing quote, the last text its scanner matched); `num_sync` is
//! checked for range (PostgreSQL's `atoi` overflows silently).

use std::fmt;

/// How `num_sync` standbys are chosen (`syncrep_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `FIRST k`, a number alone, or a plain list: the `k` streaming
    /// standbys earliest in the list (`SYNC_REP_PRIORITY`).
    Priority,
    /// `ANY k`: any `k` of the streaming standbys in the list
    /// (`SYNC_REP_QUORUM`).
    Quorum,
}

impl Method {
    /// The keyword of the canonical form.
    pub fn keyword(self) -> &'static str {
        match self {
            Method::Priority => "FIRST",
            Method::Quorum => "ANY",
        }
    }
}

/// The largest `num_sync` taken: PostgreSQL's field is an `int`.
pub const MAX_NUM_SYNC: u32 = i32::MAX as u32;

/// A parsed, non-empty `synchronous_standby_names`.
///
/// Invariants: `num_sync >= 1`, `names` is not empty. `num_sync` may exceed
/// the number of names (PostgreSQL accepts it: with `*`, or with several
/// standbys under one name, it can still be met).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyNames {
    method: Method,
    num_sync: u32,
    names: Vec<String>,
}

/// Why a `synchronous_standby_names` value was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StandbyNamesError {
    /// Worded as PostgreSQL's `syncrep_yyerror`, plus the position.
    #[error("{message} at or near \"{near}\" at character {position}")]
    Near {
        /// `syntax error` or `unterminated quoted identifier`.
        message: &'static str,
        /// The offending token's text.
        near: String,
        /// 1-based, in characters (as PostgreSQL's error positions).
        position: usize,
    },
    #[error("{message} at end of input")]
    AtEnd { message: &'static str },
    #[error("number of synchronous standbys ({0}) must be greater than zero")]
    NotPositive(u32),
    #[error("number of synchronous standbys ({0}) is out of range (at most {MAX_NUM_SYNC})")]
    OutOfRange(String),
    #[error("a synchronous standby list needs at least one name")]
    NoNames,
}

impl StandbyNames {
    /// Parses a setting's value; `Ok(None)` for the empty string (no
    /// synchronous standbys, as `SyncStandbysDefined()` is false).
    pub fn parse(text: &str) -> Result<Option<StandbyNames>, StandbyNamesError> {
        if text.is_empty() {
            return Ok(None);
        }
        Parser::new(text).parse().map(Some)
    }

    /// A policy built directly (tests, and callers that do not start from
    /// text). The same checks as [`StandbyNames::parse`] after its grammar.
    pub fn new(
        method: Method,
        num_sync: u32,
        names: Vec<String>,
    ) -> Result<StandbyNames, StandbyNamesError> {
        if num_sync == 0 {
            return Err(StandbyNamesError::NotPositive(0));
        }
        if num_sync > MAX_NUM_SYNC {
            return Err(StandbyNamesError::OutOfRange(num_sync.to_string()));
        }
        if names.is_empty() {
            return Err(StandbyNamesError::NoNames);
        }
        Ok(StandbyNames {
            method,
            num_sync,
            names,
        })
    }

    pub fn method(&self) -> Method {
        self.method
    }

    /// How many standbys must have a position before it counts as synced.
    pub fn num_sync(&self) -> u32 {
        self.num_sync
    }

    /// The names as written (not case-folded; quotes removed).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The `sync_priority` of a standby called `application_name`, as
    /// `SyncRepGetStandbyPriority`: 0 when no name matches (an asynchronous
    /// standby); else, for [`Method::Priority`], the 1-based position of
    /// the first name that matches (ASCII case ignored) or is `*`, and for
    /// [`Method::Quorum`], 1. So in `FIRST 1 (a, *)` every standby but `a`
    /// has priority 2, and in `FIRST 1 (*, a)` every standby, `a` too, has 1.
    ///
    /// Cost: at most one ASCII case-insensitive comparison per name, no
    /// allocation.
    pub fn priority(&self, application_name: &str) -> u32 {
        let found = self
            .names
            .iter()
            .position(|n| n == "*" || n.eq_ignore_ascii_case(application_name));
        match (found, self.method) {
            (None, _) => 0,
            (Some(_), Method::Quorum) => 1,
            (Some(i), Method::Priority) => i as u32 + 1,
        }
    }
}

/// The canonical form: `FIRST k (a, b)` or `ANY k (a, b)`, names quoted only
/// where they must be. It parses back to an equal value.
impl fmt::Display for StandbyNames {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} (", self.method.keyword(), self.num_sync)?;
        for (i, name) in self.names.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write_name(f, name)?;
        }
        f.write_str(")")
    }
}

/// A name bare when it scans back as one name token with the same text,
/// else double-quoted with `"` doubled.
fn write_name(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    let bytes = name.as_bytes();
    let identifier = !bytes.is_empty()
        && is_ident_start(bytes[0])
        && bytes[1..].iter().all(|&b| is_ident_cont(b))
        && keyword(name).is_none();
    let number = !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit);
    if identifier || number || name == "*" {
        return f.write_str(name);
    }
    f.write_str("\"")?;
    for part in name.split_inclusive('"') {
        f.write_str(part)?;
        if part.ends_with('"') {
            f.write_str("\"")?;
        }
    }
    f.write_str("\"")
}

// --- The scanner (syncrep_scanner.l) ---

/// `{space}`: flex's `[ \t\n\r\f\v]` (Rust's ASCII whitespace lacks `\v`).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c | 0x0b)
}

/// `{ident_start}`: `[A-Za-z\200-\377_]`.
fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

/// `{ident_cont}`: `[A-Za-z\200-\377_0-9\$]`.
fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn keyword(word: &str) -> Option<Tok> {
    if word.eq_ignore_ascii_case("any") {
        Some(Tok::Any)
    } else if word.eq_ignore_ascii_case("first") {
        Some(Tok::First)
    } else {
        None
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Any,
    First,
    /// An identifier, a quoted identifier (unescaped) or `*`.
    Name(String),
    /// Digits; a name or `num_sync` depending on where it stands.
    Num,
    Comma,
    Open,
    Close,
    /// Any other character: always a syntax error.
    Junk,
    End,
}

/// A token and where it came from: `text[start..end]` is what an error
/// shows.
struct Token {
    tok: Tok,
    start: usize,
    end: usize,
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Parser<'a> {
        Parser { text, at: 0 }
    }

    /// The next token. `Err` only for an unterminated quoted identifier,
    /// the scanner's one error of its own.
    fn next(&mut self) -> Result<Token, StandbyNamesError> {
        let b = self.text.as_bytes();
        while self.at < b.len() && is_space(b[self.at]) {
            self.at += 1;
        }
        let start = self.at;
        let Some(&c) = b.get(start) else {
            return Ok(Token {
                tok: Tok::End,
                start,
                end: start,
            });
        };
        let mut end = start + 1;
        let tok = if is_ident_start(c) {
            while end < b.len() && is_ident_cont(b[end]) {
                end += 1;
            }
            let word = &self.text[start..end];
            // The keyword rules come first in the scanner, but flex takes
            // the longest match: only the whole word is a keyword.
            keyword(word).unwrap_or_else(|| Tok::Name(word.to_string()))
        } else if c.is_ascii_digit() {
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            Tok::Num
        } else if c == b'"' {
            let mut name = String::new();
            loop {
                let Some(i) = self.text[end..].find('"') else {
                    return Err(StandbyNamesError::AtEnd {
                        message: "unterminated quoted identifier",
                    });
                };
                name.push_str(&self.text[end..end + i]);
                end += i + 1;
                if b.get(end) == Some(&b'"') {
                    name.push('"');
                    end += 1;
                } else {
                    break;
                }
            }
            Tok::Name(name)
        } else {
            match c {
                b'*' => Tok::Name("*".to_string()),
                b',' => Tok::Comma,
                b'(' => Tok::Open,
                b')' => Tok::Close,
                // Every byte >= 0x80 starts an identifier, so this is one
                // ASCII character.
                _ => Tok::Junk,
            }
        };
        self.at = end;
        Ok(Token { tok, start, end })
    }

    fn syntax_error(&self, t: &Token) -> StandbyNamesError {
        if t.tok == Tok::End {
            return StandbyNamesError::AtEnd {
                message: "syntax error",
            };
        }
        StandbyNamesError::Near {
            message: "syntax error",
            near: self.text[t.start..t.end].to_string(),
            position: self.text[..t.start].chars().count() + 1,
        }
    }

    fn expect(&mut self, want: Tok) -> Result<Token, StandbyNamesError> {
        let t = self.next()?;
        if t.tok == want {
            Ok(t)
        } else {
            Err(self.syntax_error(&t))
        }
    }

    /// `standby_name`: NAME or NUM.
    fn name(&mut self) -> Result<String, StandbyNamesError> {
        let t = self.next()?;
        match t.tok {
            Tok::Name(n) => Ok(n),
            Tok::Num => Ok(self.text[t.start..t.end].to_string()),
            _ => Err(self.syntax_error(&t)),
        }
    }

    /// `standby_list` after its first name, up to the token `last`
    /// (`)` or the end).
    fn rest_of_list(
        &mut self,
        names: &mut Vec<String>,
        last: Tok,
    ) -> Result<(), StandbyNamesError> {
        loop {
            let t = self.next()?;
            if t.tok == Tok::Comma {
                names.push(self.name()?);
            } else if t.tok == last {
                return Ok(());
            } else {
                return Err(self.syntax_error(&t));
            }
        }
    }

    /// `( standby_list )` and the end of input.
    fn parenthesised(&mut self) -> Result<Vec<String>, StandbyNamesError> {
        let mut names = vec![self.name()?];
        self.rest_of_list(&mut names, Tok::Close)?;
        self.expect(Tok::End)?;
        Ok(names)
    }

    fn parse(mut self) -> Result<StandbyNames, StandbyNamesError> {
        let first = self.next()?;
        let (method, num, names) = match first.tok {
            Tok::First | Tok::Any => {
                let method = if first.tok == Tok::Any {
                    Method::Quorum
                } else {
                    Method::Priority
                };
                let num = self.expect(Tok::Num)?;
                self.expect(Tok::Open)?;
                (method, Some(num), self.parenthesised()?)
            }
            Tok::Num => {
                let t = self.next()?;
                match t.tok {
                    Tok::Open => (Method::Priority, Some(first), self.parenthesised()?),
                    // A plain list whose first name is a number.
                    Tok::Comma | Tok::End => {
                        let mut names = vec![self.text[first.start..first.end].to_string()];
                        if t.tok == Tok::Comma {
                            names.push(self.name()?);
                            self.rest_of_list(&mut names, Tok::End)?;
                        }
                        (Method::Priority, None, names)
                    }
                    _ => return Err(self.syntax_error(&t)),
                }
            }
            Tok::Name(n) => {
                let mut names = vec![n];
                self.rest_of_list(&mut names, Tok::End)?;
                (Method::Priority, None, names)
            }
            _ => return Err(self.syntax_error(&first)),
        };
        // As check_synchronous_standby_names: the grammar first, then the
        // number.
        let num_sync = match num {
            None => 1,
            Some(t) => {
                let digits = &self.text[t.start..t.end];
                match digits.parse::<u64>() {
                    Ok(n) if n <= MAX_NUM_SYNC as u64 => n as u32,
                    _ => {
                        return Err(StandbyNamesError::OutOfRange(
                            digits.trim_start_matches('0').to_string(),
                        ))
                    }
                }
            }
        };
        StandbyNames::new(method, num_sync, names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> StandbyNames {
        StandbyNames::parse(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .unwrap_or_else(|| panic!("{text:?}: empty"))
    }

    fn err(text: &str) -> String {
        match StandbyNames::parse(text) {
            Ok(v) => panic!("{text:?} parsed as {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn names(p: &StandbyNames) -> Vec<&str> {
        p.names().iter().map(String::as_str).collect()
    }

    #[test]
    fn empty_means_no_synchronous_standbys() {
        assert_eq!(StandbyNames::parse(""), Ok(None));
    }

    #[test]
    fn every_form_of_the_grammar() {
        let p = ok("FIRST 2 (s1, s2, s3)");
        assert_eq!(
            (p.method(), p.num_sync(), names(&p)),
            (Method::Priority, 2, vec!["s1", "s2", "s3"])
        );
        let p = ok("ANY 2 (s1, s2, s3)");
        assert_eq!(
            (p.method(), p.num_sync(), names(&p)),
            (Method::Quorum, 2, vec!["s1", "s2", "s3"])
        );
        // A number alone: FIRST.
        let p = ok("2 (s1, s2)");
        assert_eq!((p.method(), p.num_sync()), (Method::Priority, 2));
        // A plain list: FIRST 1.
        let p = ok("s1, s2");
        assert_eq!(
            (p.method(), p.num_sync(), names(&p)),
            (Method::Priority, 1, vec!["s1", "s2"])
        );
        let p = ok("s1");
        assert_eq!((p.num_sync(), names(&p)), (1, vec!["s1"]));
        // *, alone and in lists.
        assert_eq!(names(&ok("*")), vec!["*"]);
        assert_eq!(names(&ok("ANY 1 (*)")), vec!["*"]);
        assert_eq!(names(&ok("FIRST 1 (s1, *)")), vec!["s1", "*"]);
        // Numbers are names where a name stands.
        assert_eq!(names(&ok("1")), vec!["1"]);
        assert_eq!(names(&ok("1, 007")), vec!["1", "007"]);
        assert_eq!(names(&ok("FIRST 1 (1, 2)")), vec!["1", "2"]);
        // Leading zeros in num_sync: atoi's value.
        assert_eq!(ok("ANY 02 (a, b)").num_sync(), 2);
        // num_sync larger than the list is accepted (as PostgreSQL).
        assert_eq!(ok("FIRST 3 (a, b)").num_sync(), 3);
        // Duplicates are kept: the first match sets the priority.
        assert_eq!(names(&ok("a, a, b")), vec!["a", "a", "b"]);
    }

    #[test]
    fn keywords_in_any_case_and_only_as_whole_words() {
        for text in ["first 1 (a)", "First 1 (a)", "fIrSt 1 (a)"] {
            assert_eq!(ok(text).method(), Method::Priority, "{text}");
        }
        for text in ["any 1 (a)", "Any 1 (a)", "aNY 1 (a)"] {
            assert_eq!(ok(text).method(), Method::Quorum, "{text}");
        }
        // The longest match is a name.
        assert_eq!(
            names(&ok("anybody, first2, firsts, any$")),
            vec!["anybody", "first2", "firsts", "any$"]
        );
        // A standby called any or first must be quoted.
        assert_eq!(err("any"), "syntax error at end of input");
        assert_eq!(
            err("FIRST 1 (first)"),
            "syntax error at or near \"first\" at character 10"
        );
        assert_eq!(
            names(&ok("FIRST 1 (\"first\", \"ANY\")")),
            vec!["first", "ANY"]
        );
    }

    #[test]
    fn names_keep_their_case_and_match_ignoring_it() {
        // syncrep_scanner.l keeps yytext; pg_strcasecmp compares.
        let p = ok("FIRST 1 (Alpha, \"BETA\", gamma)");
        assert_eq!(names(&p), vec!["Alpha", "BETA", "gamma"]);
        assert_eq!(p.priority("alpha"), 1);
        assert_eq!(p.priority("ALPHA"), 1);
        assert_eq!(p.priority("beta"), 2);
        assert_eq!(p.priority("Gamma"), 3);
        assert_eq!(p.priority("delta"), 0);
        // Quoting does not make a name case-sensitive.
        assert_eq!(ok("\"S1\"").priority("s1"), 1);
    }

    #[test]
    fn quoted_names() {
        let p = ok(r#"FIRST 1 ("my standby", "a""b", "x,y", "(", "", "*")"#);
        assert_eq!(names(&p), vec!["my standby", "a\"b", "x,y", "(", "", "*"]);
        // A quoted * is * (strcmp(standby_name, "*") sees the same text).
        assert_eq!(ok("\"*\"").priority("anything"), 1);
        // Letters beyond ASCII are identifier characters.
        assert_eq!(names(&ok("café, ünïcode_1")), vec!["café", "ünïcode_1"]);
        assert_eq!(
            err("FIRST 1 (\"open"),
            "unterminated quoted identifier at end of input"
        );
        assert_eq!(err("\""), "unterminated quoted identifier at end of input");
        assert_eq!(
            err("\"a\"\""),
            "unterminated quoted identifier at end of input"
        );
    }

    #[test]
    fn whitespace_anywhere_between_tokens() {
        let p = ok(" \t\n ANY\x0b3\x0c(\r\na ,b,\tc\n)\n ");
        assert_eq!(
            (p.method(), p.num_sync(), names(&p)),
            (Method::Quorum, 3, vec!["a", "b", "c"])
        );
        assert_eq!(ok("FIRST 1(a)").num_sync(), 1);
        // Blanks alone are not empty (SyncStandbysDefined is true for them).
        assert_eq!(err("   "), "syntax error at end of input");
    }

    #[test]
    fn syntax_errors_name_the_token_and_its_position() {
        for (text, want) in [
            ("FIRST 1 (a, b", "syntax error at end of input"),
            (
                "FIRST 1 (a, b) c",
                "syntax error at or near \"c\" at character 16",
            ),
            (
                "FIRST 1 (a, b))",
                "syntax error at or near \")\" at character 15",
            ),
            ("ANY (a, b)", "syntax error at or near \"(\" at character 5"),
            ("ANY x (a)", "syntax error at or near \"x\" at character 5"),
            ("ANY 1 a", "syntax error at or near \"a\" at character 7"),
            ("ANY 1 ()", "syntax error at or near \")\" at character 8"),
            ("FIRST", "syntax error at end of input"),
            ("a b", "syntax error at or near \"b\" at character 3"),
            ("a,", "syntax error at end of input"),
            (",a", "syntax error at or near \",\" at character 1"),
            ("a,,b", "syntax error at or near \",\" at character 3"),
            ("a (b)", "syntax error at or near \"(\" at character 3"),
            ("2 (a) 3", "syntax error at or near \"3\" at character 7"),
            ("2 a", "syntax error at or near \"a\" at character 3"),
            ("2a", "syntax error at or near \"a\" at character 2"),
            ("s-1", "syntax error at or near \"-\" at character 2"),
            ("a; b", "syntax error at or near \";\" at character 2"),
            (
                "FIRST 1 (a) \"b\"",
                "syntax error at or near \"\"b\"\" at character 13",
            ),
            ("()", "syntax error at or near \"(\" at character 1"),
            // Positions count characters, not bytes.
            ("é é", "syntax error at or near \"é\" at character 3"),
            // The first error wins: the bad quote later is never scanned.
            ("a b \"c", "syntax error at or near \"b\" at character 3"),
        ] {
            assert_eq!(err(text), want, "{text:?}");
        }
    }

    #[test]
    fn num_sync_must_be_positive_and_in_range() {
        assert_eq!(
            err("FIRST 0 (a)"),
            "number of synchronous standbys (0) must be greater than zero"
        );
        assert_eq!(
            err("ANY 000 (a)"),
            "number of synchronous standbys (0) must be greater than zero"
        );
        assert_eq!(
            err("0 (a)"),
            "number of synchronous standbys (0) must be greater than zero"
        );
        // The grammar is checked before the number.
        assert_eq!(err("FIRST 0 (a"), "syntax error at end of input");
        assert_eq!(ok("ANY 2147483647 (*)").num_sync(), MAX_NUM_SYNC);
        assert_eq!(
            err("ANY 2147483648 (*)"),
            "number of synchronous standbys (2147483648) is out of range (at most 2147483647)"
        );
        assert!(err("ANY 99999999999999999999999 (*)").contains("out of range"));
        // A plain list of 0 is a standby named "0", not num_sync 0.
        assert_eq!(names(&ok("0")), vec!["0"]);
    }

    #[test]
    fn priorities_follow_the_first_match() {
        let p = ok("FIRST 1 (a, *, b)");
        assert_eq!(p.priority("a"), 1);
        assert_eq!(p.priority("b"), 2, "* comes first");
        assert_eq!(p.priority("zzz"), 2);
        let p = ok("FIRST 1 (*, a)");
        assert_eq!(p.priority("a"), 1);
        let p = ok("a, b, a");
        assert_eq!(p.priority("a"), 1);
        assert_eq!(p.priority("b"), 2);
        // Quorum: every match has priority 1.
        let p = ok("ANY 2 (a, b, c)");
        assert_eq!(
            (p.priority("a"), p.priority("c"), p.priority("d")),
            (1, 1, 0)
        );
    }

    #[test]
    fn display_is_canonical_and_parses_back() {
        for (text, shown) in [
            ("s1, s2", "FIRST 1 (s1, s2)"),
            ("2 (s1, s2)", "FIRST 2 (s1, s2)"),
            ("any 1 ( * )", "ANY 1 (*)"),
            ("first 02 (Alpha,\"beta\")", "FIRST 2 (Alpha, beta)"),
            (
                "FIRST 1 (\"any\", \"First\")",
                "FIRST 1 (\"any\", \"First\")",
            ),
            (
                r#"ANY 1 ("a b", "q""q", "", "1x", 007, "*")"#,
                r#"ANY 1 ("a b", "q""q", "", "1x", 007, *)"#,
            ),
            ("café", "FIRST 1 (café)"),
            ("anybody", "FIRST 1 (anybody)"),
        ] {
            let p = ok(text);
            assert_eq!(p.to_string(), shown, "{text:?}");
            assert_eq!(ok(shown), p, "{shown:?}");
        }
    }

    #[test]
    fn new_checks_what_parse_checks() {
        assert_eq!(
            StandbyNames::new(Method::Quorum, 0, vec!["a".into()]),
            Err(StandbyNamesError::NotPositive(0))
        );
        assert_eq!(
            StandbyNames::new(Method::Quorum, 1, vec![]),
            Err(StandbyNamesError::NoNames)
        );
        assert!(StandbyNames::new(Method::Quorum, MAX_NUM_SYNC + 1, vec!["a".into()]).is_err());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn any_name() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z_][a-zA-Z0-9_$]{0,8}",
                "[0-9]{1,4}",
                Just("*".to_string()),
                "(?i)any|first",
                "[a-zé ,()\"*$-]{0,6}",
                ".{0,6}",
            ]
        }

        fn any_policy() -> impl Strategy<Value = StandbyNames> {
            (
                prop_oneof![Just(Method::Priority), Just(Method::Quorum)],
                prop_oneof![1u32..=8, Just(MAX_NUM_SYNC)],
                proptest::collection::vec(any_name(), 1..6),
            )
                .prop_map(|(m, k, names)| StandbyNames::new(m, k, names).unwrap())
        }

        proptest! {
            /// Display then parse gives back the same policy.
            #[test]
            fn display_parses_back(p in any_policy()) {
                let shown = p.to_string();
                prop_assert_eq!(StandbyNames::parse(&shown), Ok(Some(p)), "{}", shown);
            }

            /// Any text: no panic; what parses prints to a fixed point.
            #[test]
            fn parse_is_total_and_display_is_a_fixed_point(
                text in "(FIRST |any |2 )?[ a-zA-Z0-9_,()\"*$é\t-]{0,24}"
            ) {
                if let Ok(Some(p)) = StandbyNames::parse(&text) {
                    let shown = p.to_string();
                    let again = StandbyNames::parse(&shown).unwrap().unwrap();
                    prop_assert_eq!(&again, &p);
                    prop_assert_eq!(again.to_string(), shown);
                }
            }
        }
    }
}
