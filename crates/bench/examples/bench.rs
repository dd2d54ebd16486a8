//! Runs the load generator on its own, without the server binary:
//! `cargo run --release -p switchboard-bench --example bench -- fanout --subs 100 --rate 10`.
//! It takes the same arguments as `switchboard bench`.

use clap::Parser;
use switchboard_bench::BenchCommand;

#[derive(Parser)]
#[command(about = "Switchboard load generator")]
struct Cli {
    #[command(subcommand)]
    cmd: BenchCommand,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchboard_bench::run(Cli::parse().cmd).await
}
