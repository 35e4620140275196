//! The `blkmirror` command line: clap definitions only; the work lives in the library.

use blkmirror::disk::spec::VolumeSpec;
use blkmirror::primary::{self, PrimaryOptions};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "blkmirror",
    version,
    about = "Userspace block-level replication over NBD and QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve volumes over NBD on the primary host.
    Primary {
        /// NAME=PATH[,size=SIZE][,ro]; PATH is a file or block device, created sparse when
        /// missing and size= is given. The export name is NAME.
        #[arg(long = "volume", required = true)]
        volumes: Vec<VolumeSpec>,
        /// Unix socket to serve NBD on.
        #[arg(long)]
        nbd_unix: PathBuf,
        /// Also serve NBD on this TCP ADDR:PORT.
        #[arg(long)]
        nbd_tcp: Option<String>,
        /// Directory for the daemon's state (locked: one daemon per directory).
        #[arg(long)]
        state_dir: PathBuf,
        /// Test only: inject disk faults, OP:WHAT[:START-END][:COUNT] (see docs/TESTING.md).
        #[arg(long = "inject-fault", hide = true)]
        faults: Vec<String>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BLKMIRROR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Primary {
            volumes,
            nbd_unix,
            nbd_tcp,
            state_dir,
            faults,
        } => primary::run(PrimaryOptions {
            volumes,
            nbd_unix,
            nbd_tcp,
            state_dir,
            faults,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("blkmirror: {e}");
            ExitCode::from(1)
        }
    }
}
