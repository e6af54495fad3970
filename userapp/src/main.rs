//! `shuntctl`: the administrator's tool for the Shunt minifilter.
//!
//! `load` and `unload` do what `fltmc load shunt` / `fltmc unload shunt` do (FilterLoad / FilterUnload in
//! fltlib.dll, after enabling SeLoadDriverPrivilege). Commands that need the driver only work on Windows; on other
//! hosts they fail with a message saying so.

mod driver_control;
mod error;
mod policy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::CliError;

/// Load, unload and configure the Shunt file-redirection minifilter.
#[derive(Parser, Debug)]
#[command(name = "shuntctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the driver (what `fltmc load shunt` does). Needs an elevated prompt on Windows.
    Load {
        /// The service name the driver was installed under.
        #[arg(long, default_value = driver_control::SERVICE_NAME)]
        service: String,
    },
    /// Unload the driver (what `fltmc unload shunt` does). Refused while files are redirected.
    Unload {
        /// The service name the driver was installed under.
        #[arg(long, default_value = driver_control::SERVICE_NAME)]
        service: String,
    },
    /// Check, test and compile policy files (works on any host).
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Load { service } => {
            driver_control::load(&service)?;
            println!("loaded {service}");
        }
        Command::Unload { service } => {
            driver_control::unload(&service)?;
            println!("unloaded {service}");
        }
        Command::Policy { command } => policy::run(command)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shuntctl: {error}");
            error.exit_code()
        }
    }
}
