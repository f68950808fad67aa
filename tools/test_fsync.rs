//! Scaffold: being written (issue: operator tools).

use clap::Args;

#[derive(Args)]
pub struct TestFsyncArgs {}

pub fn run(_args: TestFsyncArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
