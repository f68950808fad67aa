//! Scaffold: being written (issue: operator tools).

use clap::Args;

#[derive(Args)]
pub struct ControldataArgs {}

pub fn run(_args: ControldataArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
