//! lb-demo: builds a small namespace topology, runs lb-agent on the example manifests and sends
//! real traffic through it. Needs root. Cleans up after itself.
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Standalone demo of the load balancer in network namespaces")]
struct Args {
    /// Manifests to load [default: the repository's examples/manifests].
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/manifests"))]
    manifests: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bin_dir = std::env::current_exe()?.parent().context("binary directory")?.to_path_buf();
    let manifests = args.manifests.canonicalize().with_context(|| format!("manifests {}", args.manifests.display()))?;
    testbed::demo::run(&bin_dir, &manifests)
}
