//! The `walden` binary: one command, subcommands for every job. The code of
//! the tools lives in `tools/`.

#[path = "../tools/mod.rs"]
mod tools;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "walden",
    version,
    about = "walden: a write-ahead-log appliance for Linux",
    long_about = "walden appends records to a write-ahead log with group commit and acknowledges \
                  each at the durability level asked for (off, local, remote_write, on, remote_apply)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the WAL engine behind the wire protocol (docs/protocol.md).
    Serve(tools::serve::ServeArgs),
    /// Append records (one per line of FILE or standard input) and print their LSNs.
    Append(tools::client_cli::AppendArgs),
    /// Print records from an LSN (and, with --follow, as they become durable).
    Read(tools::client_cli::ReadArgs),
    /// Show a running server's LSNs and settings.
    Status(tools::client_cli::StatusArgs),
    /// Write or read pages of the page store.
    Page(tools::page_cli::PageArgs),
    /// Run an immediate checkpoint, like PostgreSQL's CHECKPOINT.
    Checkpoint(tools::page_cli::CheckpointArgs),
    /// Create, drop or list replication slots (pg_create_physical_replication_slot, pg_replication_slots).
    Slot(tools::client_cli::SlotArgs),
    /// End a standby's recovery: it becomes a primary on a new timeline, like pg_ctl promote.
    Promote(tools::promote::PromoteArgs),
    /// Copy a running primary's page store and WAL into a new directory, like pg_basebackup.
    Basebackup(tools::basebackup::BasebackupArgs),
    /// Bring a stopped server whose WAL diverged back in line with a running source, like pg_rewind.
    Rewind(tools::rewind::RewindArgs),
    /// Load generator, like pgbench: appends records and reports rate and commit latency.
    Bench(tools::bench::BenchArgs),
    /// Compare WAL sync methods on this device, like pg_test_fsync (and through io_uring).
    TestFsync(tools::test_fsync::TestFsyncArgs),
    /// Decode and print WAL records, like pg_waldump.
    Waldump(tools::waldump::WaldumpArgs),
    /// Print the control information of a walden data directory, like pg_controldata.
    Controldata(tools::controldata::ControldataArgs),
    /// Check that every record of a bench --ack-log is in the WAL, byte for byte (server stopped).
    Verify(tools::verify::VerifyArgs),
    /// Kill the real server with SIGKILL under load, over and over, and verify every acknowledged record survived.
    Crashtest(tools::crashtest::CrashtestArgs),
    /// (testing) Append records, printing one line per acknowledged record, until killed.
    #[command(hide = true)]
    WalChild(tools::wal_child::WalChildArgs),
    /// (testing) Mix records and page writes on the page store, printing each durable one, until killed.
    #[command(hide = true)]
    StoreChild(tools::store_child::StoreChildArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WALDEN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    quiet_when_stdout_closes();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => tools::serve::run(args),
        Command::Append(args) => tools::client_cli::append(args),
        Command::Read(args) => tools::client_cli::read(args),
        Command::Status(args) => tools::client_cli::status(args),
        Command::Page(args) => tools::page_cli::run(args),
        Command::Checkpoint(args) => tools::page_cli::checkpoint(args),
        Command::Slot(args) => tools::client_cli::slot(args),
        Command::Promote(args) => tools::promote::run(args),
        Command::Basebackup(args) => tools::basebackup::run(args),
        Command::Rewind(args) => tools::rewind::run(args),
        Command::Bench(args) => tools::bench::run(args),
        Command::TestFsync(args) => tools::test_fsync::run(args),
        Command::Waldump(args) => tools::waldump::run(args),
        Command::Controldata(args) => tools::controldata::run(args),
        Command::Verify(args) => tools::verify::run(args),
        Command::Crashtest(args) => tools::crashtest::run(args),
        Command::WalChild(args) => tools::wal_child::run(args),
        Command::StoreChild(args) => tools::store_child::run(args),
    };
    if let Err(e) = result {
        // A write to standard output whose reader has gone (`| head`): the
        // tools return stdout's io::Error as is; socket and file errors
        // come wrapped in walden's own errors or with context.
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        {
            std::process::exit(0);
        }
        eprintln!("walden: error: {}", tools::common::describe(&e));
        std::process::exit(1);
    }
}

/// `walden status | head`: once the reader of standard output has gone, a
/// tool stops quietly, as a C tool killed by SIGPIPE does, instead of
/// panicking in `println!`. (SIGPIPE itself stays ignored: a client whose
/// server closed the socket must get an error, not die.)
fn quiet_when_stdout_closes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info)
    }));
}
