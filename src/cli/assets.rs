//! `egressd generate-assets DIR` (hidden): the man pages and shell completions, generated from the command line's
//! own definition so they never drift from it. `scripts/package-deb` puts them into the Debian package.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

#[derive(Debug, clap::Args)]
pub struct AssetsArgs {
    /// Where to write `man/*.8` and `completions/{egressd.bash,_egressd,egressd.fish}`.
    pub dir: PathBuf,
}

pub fn generate(args: AssetsArgs) -> anyhow::Result<ExitCode> {
    let man = args.dir.join("man");
    let completions = args.dir.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let cmd = super::Cli::command();
    write_man(&man, cmd.clone(), "egressd")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("egressd-{}", sub.get_name());
        write_man(&man, sub.clone().name(name.clone()).display_name(name.clone()), &name)?;
    }
    for (shell, file) in [
        (clap_complete::Shell::Bash, "egressd.bash"),
        (clap_complete::Shell::Zsh, "_egressd"),
        (clap_complete::Shell::Fish, "egressd.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut super::Cli::command(), "egressd", &mut out);
        write(&completions.join(file), &out)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_man(dir: &Path, cmd: clap::Command, name: &str) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).section("8").render(&mut out).context("rendering a man page")?;
    write(&dir.join(format!("{name}.8")), &out)
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}
