//! `baton launch --max-restarts K -- <job>`: supervises a training job — `mpirun -np N baton train …`,
//! `srun --mpi=pmix -n N baton train …`, or `baton train …` itself — and, when it fails, runs it again from the
//! newest complete checkpoint (`--resume latest`), up to K times. Each restart is printed with its cause and
//! appended to `<out>/restarts.jsonl`: the lost rank with its replica and stages (from the rank map the job
//! printed at start and the launcher's report of which process died), or the error a rank printed.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::CliError;

/// Most restarts `--max-restarts` accepts.
pub const MAX_RESTARTS_LIMIT: u32 = 1000;

/// `baton launch`'s arguments.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// Restarts after a failure; each resumes from the newest complete checkpoint under the job's `--out`.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
    /// Seconds to wait before each restart.
    #[arg(long, default_value_t = 1.0)]
    pub restart_delay: f64,
    /// The job, after `--`: `mpirun -np N baton train … --out DIR`, `srun --mpi=pmix -n N baton train …`, or
    /// `baton train …`. It must name its `--out` (where the checkpoints a restart resumes from are).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// What the launcher learned about a failed attempt from the job's output.
#[derive(Debug, Default)]
struct Seen {
    /// `rank N on HOST: replica R, stage(s) …` lines of the rank map, by rank.
    ranks: Vec<(usize, String)>,
    /// The process the launcher (mpirun / srun) reported dead, and how.
    lost: Option<(usize, String)>,
    /// The first error a rank printed (`baton: rank N: …`) or the job's own error line.
    error: Option<String>,
}

impl Seen {
    fn read(&mut self, line: &str) {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("rank ") {
            if let Some((n, what)) = rest.split_once(" on ") {
                if let Ok(n) = n.parse::<usize>() {
                    if what.contains("replica") {
                        self.ranks.push((n, format!("rank {n} on {what}")));
                    }
                }
            }
        }
        // mpirun: "mpirun noticed that process rank 2 with PID 123 on node vm exited on signal 9 (Killed)."
        if let Some(i) = t.find("process rank ") {
            let rest = &t[i + "process rank ".len()..];
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse::<usize>().ok()) {
                let how = rest
                    .find("exited")
                    .map(|j| rest[j..].trim_end_matches('.').to_string())
                    .unwrap_or_else(|| "was lost".into());
                self.lost.get_or_insert((n, how));
            }
        }
        // srun: "srun: error: vm: task 2: Killed"
        if let Some(i) = t.find(": task ") {
            if t.starts_with("srun:") {
                let rest = &t[i + ": task ".len()..];
                if let Some((n, how)) = rest.split_once(':') {
                    if let Ok(n) = n.trim().parse::<usize>() {
                        self.lost.get_or_insert((n, how.trim().to_lowercase()));
                    }
                }
            }
        }
        if self.error.is_none() && t.starts_with("baton: ") && !t.starts_with("baton launch") {
            self.error = Some(t["baton: ".len()..].to_string());
        }
    }

    /// The cause of the failure in one line.
    fn cause(&self, status: &str) -> String {
        let mut out = match &self.lost {
            Some((n, how)) => {
                let place = self
                    .ranks
                    .iter()
                    .find(|(r, _)| r == n)
                    .map_or(format!("rank {n}"), |(_, line)| line.clone());
                format!("lost {place} ({how})")
            }
            None => format!("the job ended with {status}"),
        };
        if let Some(e) = &self.error {
            out.push_str(&format!("; {e}"));
        }
        out
    }
}

/// The value of `--out` in the job's arguments.
fn out_dir(cmd: &[String]) -> Option<PathBuf> {
    cmd.iter().enumerate().find_map(|(i, a)| {
        if a == "--out" {
            cmd.get(i + 1).map(PathBuf::from)
        } else {
            a.strip_prefix("--out=").map(PathBuf::from)
        }
    })
}

/// Runs `cmd` once, echoing its stderr while reading it; returns whether it succeeded, its status and what its
/// output said.
fn attempt(cmd: &[String]) -> Result<(bool, String, Seen), CliError> {
    let mut child = Command::new(&cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::failure(format!("launch: cannot start `{}`: {e}", cmd[0])))?;
    let mut seen = Seen::default();
    if let Some(err) = child.stderr.take() {
        let mut echo = std::io::stderr();
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(echo, "{line}");
            seen.read(&line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| CliError::failure(format!("launch: waiting for the job: {e}")))?;
    let text = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".into(),
    };
    Ok((status.success(), text, seen))
}

/// Appends one restart to `<out>/restarts.jsonl`.
fn log_restart(out: &Path, n: u32, cause: &str, resumed: bool) -> Result<(), CliError> {
    let path = out.join("restarts.jsonl");
    let line = serde_json::json!({
        "restart": n,
        "cause": cause,
        "resume": if resumed { "latest" } else { "start" },
        "unix_s": crate::engine::trainer::unix_time_s(),
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| CliError::failure(format!("launch: {}: {e}", path.display())))?;
    writeln!(f, "{line}").map_err(|e| CliError::failure(format!("launch: {}: {e}", path.display())))
}

/// Runs `baton launch`.
pub fn run(args: &LaunchArgs) -> Result<(), CliError> {
    if args.max_restarts > MAX_RESTARTS_LIMIT {
        return Err(CliError::usage(format!(
            "--max-restarts {}: at most {MAX_RESTARTS_LIMIT}",
            args.max_restarts
        )));
    }
    if !(args.restart_delay.is_finite() && args.restart_delay >= 0.0) {
        return Err(CliError::usage(format!(
            "--restart-delay {}: expected a number of seconds ≥ 0",
            args.restart_delay
        )));
    }
    let cmd = &args.command;
    if !cmd.iter().any(|a| a == "train") {
        return Err(CliError::usage(
            "launch supervises a `baton train` job: give it after `--` (e.g. `-- mpirun -np 4 baton train --out DIR …`)",
        ));
    }
    let out = out_dir(cmd).ok_or_else(|| {
        CliError::usage("the job's `baton train` needs --out DIR: a restart resumes from the checkpoints there")
    })?;
    let has_resume = cmd.iter().any(|a| a == "--resume" || a.starts_with("--resume="));
    let started = Instant::now();
    for n in 0..=args.max_restarts {
        let latest = out.join("checkpoints").join(crate::engine::checkpoint::LATEST_FILE);
        let resume = n > 0 && !has_resume && latest.is_file();
        let mut this = cmd.clone();
        if resume {
            this.extend(["--resume".to_string(), "latest".to_string()]);
        }
        let (ok, status, seen) = attempt(&this)?;
        if ok {
            eprintln!(
                "baton launch: the job finished after {n} restart(s) in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        let cause = seen.cause(&status);
        if n == args.max_restarts {
            return Err(CliError::failure(format!(
                "launch: the job failed {} time(s); the last: {cause}",
                n + 1
            )));
        }
        let resumes = !has_resume && latest.is_file();
        eprintln!(
            "baton launch: restart {}/{} after: {cause}; {}",
            n + 1,
            args.max_restarts,
            if resumes {
                "resuming from the newest complete checkpoint (--resume latest)"
            } else {
                "no checkpoint yet: starting again"
            }
        );
        std::fs::create_dir_all(&out).map_err(|e| CliError::failure(format!("launch: {}: {e}", out.display())))?;
        log_restart(&out, n + 1, &cause, resumes)?;
        std::thread::sleep(Duration::from_secs_f64(args.restart_delay));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_names_the_lost_rank_with_its_stages() {
        let mut s = Seen::default();
        for line in [
            "  rank 0 on vm: replica 0, stage 0",
            "  rank 2 on vm: replica 1, stage 0",
            "mpirun noticed that process rank 2 with PID 0 on node vm exited on signal 9 (Killed).",
        ] {
            s.read(line);
        }
        assert_eq!(
            s.cause("exit status 137"),
            "lost rank 2 on vm: replica 1, stage 0 (exited on signal 9 (Killed))"
        );
        let mut e = Seen::default();
        e.read("srun: error: vm: task 3: Killed");
        e.read("baton: rank 1: transport on stage 1: waited past the deadline");
        assert_eq!(
            e.cause("exit status 1"),
            "lost rank 3 (killed); rank 1: transport on stage 1: waited past the deadline"
        );
        assert_eq!(
            Seen::default().cause("exit status 1"),
            "the job ended with exit status 1"
        );
    }

    #[test]
    fn the_out_directory_is_found_in_either_form() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(out_dir(&v(&["baton", "train", "--out", "x"])), Some(PathBuf::from("x")));
        assert_eq!(out_dir(&v(&["baton", "train", "--out=y"])), Some(PathBuf::from("y")));
        assert_eq!(out_dir(&v(&["baton", "train"])), None);
    }
}
