//! Scaffold: being written (issue: operator tools).

use clap::Args;

#[derive(Args)]
pub struct WaldumpArgs {}

pub fn run(_args: WaldumpArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
