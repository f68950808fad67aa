//! `primary_conninfo`: libpq's `keyword=value` connection string, the part
//! a walden standby needs (`host`, `port`, `application_name`,
//! `connect_timeout`). Pure: no I/O.
//!
//! Values are bare words or single-quoted (`'a b'`, with `\'` and `\\`
//! escapes), as libpq's `conninfo_parse`. An unknown keyword is an error
//! (`invalid connection option "x"`), as in libpq: a typo must not turn
//! into a silently different connection.

use std::time::Duration;

/// A parsed `primary_conninfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    /// The name the primary knows this standby by (its
    /// `synchronous_standby_names` lists these). Default `walreceiver`, as
    /// PostgreSQL's.
    pub application_name: String,
    pub connect_timeout: Option<Duration>,
}

impl ConnInfo {
    /// `host:port`, for connecting and for messages.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn parse(text: &str) -> Result<ConnInfo, String> {
        let mut host = None;
        let mut port = None;
        let mut application_name = None;
        let mut connect_timeout = None;
        let b = text.as_bytes();
        let mut i = 0;
        loop {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i == b.len() {
                break;
            }
            let k0 = i;
            while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() {
                i += 1;
            }
            let key = &text[k0..i];
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i == b.len() || b[i] != b'=' {
                return Err(format!(
                    "missing \"=\" after \"{key}\" in connection info string"
                ));
            }
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value = Vec::new();
            if i < b.len() && b[i] == b'\'' {
                i += 1;
                loop {
                    if i == b.len() {
                        return Err("unterminated quoted string in connection info string".into());
                    }
                    match b[i] {
                        b'\\' if i + 1 < b.len() => {
                            value.push(b[i + 1]);
                            i += 2;
                        }
                        b'\'' => {
                            i += 1;
                            break;
                        }
                        c => {
                            value.push(c);
                            i += 1;
                        }
                    }
                }
            } else {
                while i < b.len() && !b[i].is_ascii_whitespace() {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    value.push(b[i]);
                    i += 1;
                }
            }
            let value = String::from_utf8(value)
                .map_err(|_| format!("the value of \"{key}\" is not UTF-8"))?;
            match key {
                "host" | "hostaddr" => host = Some(value),
                "port" => {
                    port = Some(
                        value
                            .parse::<u16>()
                            .ok()
                            .filter(|p| *p > 0)
                            .ok_or_else(|| format!("invalid port number: \"{value}\""))?,
                    )
                }
                "application_name" => application_name = Some(value),
                "connect_timeout" => {
                    let s: u64 = value.parse().map_err(|_| {
                        format!("invalid integer value \"{value}\" for connection option \"connect_timeout\"")
                    })?;
                    connect_timeout = (s > 0).then(|| Duration::from_secs(s.max(2)));
                }
                _ => return Err(format!("invalid connection option \"{key}\"")),
            }
        }
        let host = host.ok_or("no host: say host=ADDRESS (and port=PORT)")?;
        if host.is_empty() {
            return Err("host is empty".into());
        }
        Ok(ConnInfo {
            host,
            port: port.unwrap_or(7480),
            application_name: application_name.unwrap_or_else(|| "walreceiver".into()),
            connect_timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libpq_style_strings() {
        let c = ConnInfo::parse("host=10.0.0.1 port=5433 application_name=s1").unwrap();
        assert_eq!(c.host, "10.0.0.1");
        assert_eq!(c.port, 5433);
        assert_eq!(c.application_name, "s1");
        assert_eq!(c.address(), "10.0.0.1:5433");
        let c = ConnInfo::parse("  host = 'db one'  application_name='it\\'s'  ").unwrap();
        assert_eq!(c.host, "db one");
        assert_eq!(c.port, 7480);
        assert_eq!(c.application_name, "it's");
        assert_eq!(
            ConnInfo::parse("host=::1 port=1").unwrap().address(),
            "[::1]:1"
        );
        assert_eq!(
            ConnInfo::parse("host=h").unwrap().application_name,
            "walreceiver"
        );
    }

    #[test]
    fn refuses_what_libpq_refuses() {
        for (text, want) in [
            ("host=h prot=1", "invalid connection option \"prot\""),
            ("host=h port=x", "invalid port number: \"x\""),
            ("host=h port=0", "invalid port number: \"0\""),
            ("host", "missing \"=\" after \"host\""),
            ("host='h", "unterminated quoted string"),
            ("port=1", "no host"),
        ] {
            let e = ConnInfo::parse(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
