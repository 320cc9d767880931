//! The `baton` command line; see `baton --help`.

use std::process::ExitCode;

fn main() -> ExitCode {
    baton::cli::main()
}
