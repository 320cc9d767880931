//! `baton train` over several processes under `mpirun` (the `mpi` feature; `scripts/test.sh` installs OpenMPI and
//! runs this suite with `--features mpi`): the multi-process runs end bitwise equal to the single-process ones, a
//! killed rank ends the job within a bound and `baton launch` restarts it from the newest checkpoint, ending
//! bitwise equal to an uninterrupted run. Without the feature, a `baton` started as one of several ranks refuses.

mod common;

#[cfg(feature = "mpi")]
mod with_mpi {
    use std::os::unix::process::CommandExt;
    use std::path::Path;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use super::common::{baton, err, tmp};

    const SUITE: &str = "cli-mpi";

    /// A small model, 8 sequences in 4 micro-batches, no evaluation, a checkpoint every `save` steps.
    fn model(steps: &str, save: &'static str) -> Vec<String> {
        [
            "--layers",
            "4",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--seq",
            "16",
            "--batch",
            "8",
            "--microbatches",
            "4",
            "--eval-every",
            "0",
            "--keep-last",
            "0",
            "--save-every",
            save,
            "--steps",
            steps,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// `mpirun -np N` as root on two cores: every rank may share a core.
    fn mpirun(np: usize) -> Command {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        c
    }

    fn train_args(extra: &[&str], model: &[String], out: &Path) -> Vec<String> {
        let mut a = vec!["train".to_string()];
        a.extend(model.iter().cloned());
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(["--out".to_string(), out.display().to_string()]);
        a
    }

    fn mpi_train(np: usize, extra: &[&str], model: &[String], out: &Path) -> Output {
        mpirun(np)
            .arg(env!("CARGO_BIN_EXE_baton"))
            .args(train_args(extra, model, out))
            .output()
            .expect("mpirun runs")
    }

    /// The same training in one process, into a fresh directory named `name`.
    fn single_process(name: &str, layout: &[&str], model: &[String]) -> super::common::TmpDir {
        single_process_with_log(name, layout, model).0
    }

    /// [`single_process`] and its standard error.
    fn single_process_with_log(name: &str, layout: &[&str], model: &[String]) -> (super::common::TmpDir, String) {
        let out = tmp(SUITE, name);
        let args = train_args(layout, model, &out);
        let o = baton(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{name}: {}", err(&o));
        (out, err(&o))
    }

    /// What the summary says each worker holds in AdamW moments (the end of its data-parallel line).
    fn moments_per_worker(log: &str) -> Option<String> {
        log.lines().find_map(|l| {
            l.split_once("AdamW moments per worker")
                .map(|(_, rest)| rest.to_string())
        })
    }

    /// Every file of the final checkpoint `step` (manifest and stage files) is bitwise the same in both runs.
    fn same_checkpoint(a: &Path, b: &Path, step: u64) {
        let dir = |root: &Path| root.join("checkpoints").join(format!("step-{step:08}"));
        let mut names: Vec<_> = std::fs::read_dir(dir(a))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert!(names.len() >= 2, "{names:?}");
        for name in names {
            let x = std::fs::read(dir(a).join(&name)).unwrap();
            let y = std::fs::read(dir(b).join(&name)).unwrap_or_else(|e| panic!("{name:?} in {}: {e}", b.display()));
            assert!(x == y, "{name:?} differs between {} and {}", a.display(), b.display());
        }
    }

    fn metrics_losses(out: &Path) -> Vec<f64> {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    }

    /// The processes of the job writing into `out` that are `baton train` with MPI rank `rank`.
    fn rank_pids(out: &Path, rank: &str) -> Vec<u32> {
        let Ok(list) = Command::new("pgrep").args(["-f", &out.display().to_string()]).output() else {
            return Vec::new();
        };
        String::from_utf8_lossy(&list.stdout)
            .lines()
            .filter_map(|pid| pid.trim().parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                    args.len() > 1 && args[0] == env!("CARGO_BIN_EXE_baton").as_bytes() && args[1] == b"train"
                })
            })
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                    env.split(|&b| b == 0)
                        .any(|kv| kv == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes())
                })
            })
            .collect()
    }

    /// Whether process `pid` still runs (a zombie, dead but not yet reaped, does not).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    }

    /// Kills a process group when dropped (a failing test leaves no job behind).
    struct KillGroup(u32);

    impl Drop for KillGroup {
        fn drop(&mut self) {
            // `kill -9 -PGID` without `--` reads `-PGID` as options: procps' kill then signals every process
            // (kill(-1)); the group must follow `--`.
            if self.0 > 1 {
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{}", self.0)])
                    .status();
            }
        }
    }

    /// (a) p = 4 over 4 processes against the same pipeline in one process, and (b) D = 2 × p = 2 over 4 processes
    /// (one worker each), over 2 processes (two stages each) and with ZeRO-1 against the in-process runs.
    #[test]
    fn several_processes_train_bitwise_like_one() {
        let m = model("6", "3");
        for (name, np, layout) in [
            ("p4", 4, &["--stages", "4"][..]),
            ("d2p2", 4, &["--stages", "2", "--data-parallel", "2"][..]),
            ("d2p2-np2", 2, &["--stages", "2", "--data-parallel", "2"][..]),
            // ZeRO-1: each tensor's moments on its owner replica's rank, gathered into the checkpoint.
            (
                "d2p2-zero1",
                4,
                &["--stages", "2", "--data-parallel", "2", "--zero", "1"][..],
            ),
        ] {
            let (single, single_log) = single_process_with_log(&format!("{name}-single"), layout, &m);
            let many = tmp(SUITE, &format!("{name}-mpi"));
            let o = mpi_train(np, layout, &m, &many);
            let e = err(&o);
            assert!(o.status.success(), "{name}: {e}");
            // Rank 0's summary counts the moments of the workers other ranks run too.
            assert_eq!(
                moments_per_worker(&e),
                moments_per_worker(&single_log),
                "{name}: AdamW moments per worker"
            );
            assert!(
                e.contains(&format!("ranks: {np} processes")),
                "{name}: the rank map is printed: {e}"
            );
            assert!(e.contains("rank 1 on "), "{name}: {e}");
            same_checkpoint(&single, &many, 6);
            // The mid-run checkpoint too (written by every rank together, manifest last).
            same_checkpoint(&single, &many, 3);
            assert_eq!(
                metrics_losses(&single),
                metrics_losses(&many),
                "{name}: rank 0's metrics"
            );
        }
    }

    /// Two network namespaces joined by a veth pair: two emulated hosts (removed on drop). Traffic only ever goes
    /// to the two addresses inside them.
    struct TwoHosts {
        ns: [String; 2],
        subnet: String,
        agent: std::path::PathBuf,
    }

    impl TwoHosts {
        /// The hosts, or why the sandbox does not allow them.
        fn new(dir: &Path) -> Result<TwoHosts, String> {
            let id = std::process::id() % 10_000;
            let ns = [format!("baton{id}a"), format!("baton{id}b")];
            let veth = [format!("bt{id}a"), format!("bt{id}b")];
            let net = 64 + id % 128;
            let hosts = TwoHosts {
                ns: ns.clone(),
                subnet: format!("10.231.{net}.0/24"),
                agent: dir.join("agent.sh"),
            };
            let ip = |args: &[&str]| -> Result<(), String> {
                let o = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
                if o.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
            };
            for n in &ns {
                ip(&["netns", "add", n])?;
            }
            ip(&["link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1]])?;
            for (i, (n, v)) in ns.iter().zip(&veth).enumerate() {
                ip(&["link", "set", v, "netns", n])?;
                ip(&["-n", n, "addr", "add", &format!("10.231.{net}.{}/24", i + 1), "dev", v])?;
                ip(&["-n", n, "link", "set", v, "up"])?;
                ip(&["-n", n, "link", "set", "lo", "up"])?;
            }
            // mpirun's rsh agent: `agent.sh HOST CMD…` runs CMD in HOST's namespace under HOST's name.
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            let script = format!(
                "#!/bin/sh\nhost=\"$1\"; shift\ncase \"$host\" in\n  hosta) ns={} ;;\n  hostb) ns={} ;;\n  *) echo \"unknown host \
                 $host\" >&2; exit 1 ;;\nesac\nexec ip netns exec \"$ns\" unshare --uts sh -c \"hostname $host; $*\"\n",
                ns[0], ns[1]
            );
            std::fs::write(&hosts.agent, script).map_err(|e| e.to_string())?;
            Command::new("chmod")
                .arg("+x")
                .arg(&hosts.agent)
                .status()
                .map_err(|e| e.to_string())?;
            Ok(hosts)
        }
    }

    impl Drop for TwoHosts {
        fn drop(&mut self) {
            for n in &self.ns {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    /// (c) Two emulated hosts (network namespaces, MPI over TCP between them): p = 4 with stages 0–1 on one host
    /// and 2–3 on the other ends bitwise equal to one process. Skipped, with the reason, where the sandbox forbids
    /// network namespaces.
    #[test]
    fn two_hosts_over_tcp_train_bitwise_like_one_process() {
        let dir = tmp(SUITE, "two-hosts");
        let hosts = match TwoHosts::new(&dir.join("agent")) {
            Ok(h) => h,
            Err(why) => {
                eprintln!("skipped: network namespaces are not available here ({why})");
                return;
            }
        };
        let m = model("6", "3");
        let layout = ["--stages", "4"];
        let out = dir.join("run");
        let bin = env!("CARGO_BIN_EXE_baton");
        let job = format!(
            "hostname hosta; mpirun --allow-run-as-root --oversubscribe --host hosta:2,hostb:2 -np 4 --mca \
             plm_rsh_agent {} --mca btl self,tcp --mca btl_tcp_if_include {net} --mca oob_tcp_if_include {net} -x \
             OMPI_ALLOW_RUN_AS_ROOT -x OMPI_ALLOW_RUN_AS_ROOT_CONFIRM {bin} {}",
            hosts.agent.display(),
            train_args(&layout, &m, &out).join(" "),
            net = hosts.subnet,
        );
        let o = Command::new("ip")
            .args(["netns", "exec", &hosts.ns[0], "unshare", "--uts", "sh", "-c", &job])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .output()
            .unwrap();
        let e = err(&o);
        assert!(o.status.success(), "{e}");
        assert!(e.contains("ranks: 4 processes over 2 host(s)"), "{e}");
        assert!(e.contains("rank 1 on hosta: replica 0, stage 1"), "{e}");
        assert!(e.contains("rank 2 on hostb: replica 0, stage 2"), "{e}");
        let single = single_process("two-hosts-single", &layout, &m);
        same_checkpoint(&single, &out, 6);
        drop(hosts);
    }

    /// A one-node Slurm cluster in a temporary directory: munged, slurmctld and slurmd with their own socket,
    /// ports, state and logs (stopped on drop).
    struct Slurm {
        dir: std::path::PathBuf,
        conf: std::path::PathBuf,
    }

    impl Slurm {
        /// The running cluster, or why it cannot start here.
        fn start(dir: &Path) -> Result<Slurm, String> {
            for tool in ["munged", "slurmctld", "slurmd", "srun"] {
                if Command::new("sh")
                    .args(["-c", &format!("command -v {tool}")])
                    .output()
                    .map_or(true, |o| !o.status.success())
                {
                    return Err(format!("{tool} is not installed"));
                }
            }
            let run = |cmd: &mut Command| -> Result<String, String> {
                let o = cmd.output().map_err(|e| e.to_string())?;
                if o.status.success() {
                    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
                } else {
                    Err(format!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr).trim()))
                }
            };
            for sub in ["state", "spool", "log", "run", "munge"] {
                std::fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
            }
            let slurm = Slurm {
                dir: dir.to_path_buf(),
                conf: dir.join("slurm.conf"),
            };
            let d = dir.display();
            let host = run(&mut Command::new("hostname"))?.trim().to_string();
            // This machine's node line as slurmd sees it (CPUs, sockets, cores, memory).
            let node = run(Command::new("slurmd").arg("-C"))?
                .lines()
                .find(|l| l.starts_with("NodeName="))
                .ok_or("slurmd -C printed no node line")?
                .to_string();
            let port = 20_000 + std::process::id() % 20_000;
            let conf = format!(
                "ClusterName=baton\nSlurmctldHost={host}(127.0.0.1)\nSlurmctldPort={port}\nSlurmdPort={}\n\
                 AuthType=auth/munge\nAuthInfo=socket={d}/munge/munge.socket\nProctrackType=proctrack/linuxproc\n\
                 TaskPlugin=task/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n\
                 AccountingStorageType=accounting_storage/none\nJobCompType=jobcomp/none\nMpiDefault=none\n\
                 SlurmUser=root\nSlurmdUser=root\nMailProg=/bin/true\nReturnToService=2\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/run/slurmctld.pid\n\
                 SlurmdPidFile={d}/run/slurmd.pid\nSlurmctldLogFile={d}/log/slurmctld.log\n\
                 SlurmdLogFile={d}/log/slurmd.log\n{} NodeAddr=127.0.0.1 State=UNKNOWN\n\
                 PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
                port + 1,
                node.split_whitespace()
                    .filter(|w| !w.starts_with("UpTime"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            std::fs::write(&slurm.conf, conf).map_err(|e| e.to_string())?;
            run(Command::new("munged").args([
                "--force",
                &format!("--socket={d}/munge/munge.socket"),
                &format!("--pid-file={d}/munge/munged.pid"),
                &format!("--log-file={d}/munge/munged.log"),
                &format!("--seed-file={d}/munge/seed"),
            ]))?;
            run(Command::new("slurmctld").env("SLURM_CONF", &slurm.conf))?;
            run(Command::new("slurmd").env("SLURM_CONF", &slurm.conf))?;
            let up = Instant::now();
            loop {
                let idle = Command::new("sinfo")
                    .args(["-h", "-o", "%t"])
                    .env("SLURM_CONF", &slurm.conf)
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle");
                if idle {
                    return Ok(slurm);
                }
                if up.elapsed() > Duration::from_secs(30) {
                    let log = std::fs::read_to_string(dir.join("log/slurmctld.log")).unwrap_or_default();
                    return Err(format!(
                        "the node did not come up in 30 s: {}",
                        log.lines().last().unwrap_or("")
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    impl Drop for Slurm {
        fn drop(&mut self) {
            for pid_file in ["run/slurmd.pid", "run/slurmctld.pid", "munge/munged.pid"] {
                if let Ok(pid) = std::fs::read_to_string(self.dir.join(pid_file)) {
                    if let Some(pid) = pid.trim().parse::<u32>().ok().filter(|&p| p > 1) {
                        let _ = Command::new("kill").arg(pid.to_string()).status();
                    }
                }
            }
        }
    }

    /// (d) Slurm: a one-node cluster started by the test; `srun --mpi=pmix -n 4` trains D = 2 × p = 2 (ranks and
    /// sizes from PMIx: no `OMPI_COMM_WORLD_*` under srun) and ends bitwise equal to one process. Skipped, with the
    /// reason, where Slurm cannot start.
    #[test]
    fn srun_with_pmix_trains_bitwise_like_one_process() {
        let dir = tmp(SUITE, "slurm");
        let slurm = match Slurm::start(&dir.join("cluster")) {
            Ok(s) => s,
            Err(why) => {
                eprintln!("skipped: Slurm cannot start here ({why})");
                return;
            }
        };
        let m = model("6", "3");
        let layout = ["--stages", "2", "--data-parallel", "2"];
        let out = dir.join("run");
        let o = Command::new("srun")
            .args(["-n", "4", "--overcommit", "--mpi=pmix", env!("CARGO_BIN_EXE_baton")])
            .args(train_args(&layout, &m, &out))
            .env("SLURM_CONF", &slurm.conf)
            .output()
            .unwrap();
        let e = err(&o);
        assert!(o.status.success(), "{e}");
        assert!(e.contains("ranks: 4 processes"), "{e}");
        let single = single_process("slurm-single", &layout, &m);
        same_checkpoint(&single, &out, 6);
        drop(slurm);
    }

    /// A rank that stops answering (SIGSTOP: alive, so the launcher does not end the job) is found by the others'
    /// deadlines: a rank names it (or the rank stuck behind it) with its replica and stage and ends, which ends the
    /// job, well within the bound, instead of every rank hanging.
    #[test]
    fn a_stalled_rank_is_named_by_the_deadline_and_the_job_ends() {
        let out = tmp(SUITE, "stalled");
        let mut c = mpirun(4);
        c.arg(env!("CARGO_BIN_EXE_baton"))
            .args(train_args(
                &["--stages", "2", "--data-parallel", "2"],
                &model("100000", "0"),
                &out,
            ))
            .env("BATON_COMM_TIMEOUT_S", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let job = c.spawn().unwrap();
        let group = KillGroup(job.id());
        let started = Instant::now();
        let metrics = out.join("metrics.jsonl");
        // Let it train a few steps, then stop rank 3 (replica 1, stage 1).
        while std::fs::metadata(&metrics).map_or(0, |m| m.len()) < 2000 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the job did not start training"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let victim = rank_pids(&out, "3");
        assert_eq!(victim.len(), 1, "one process is rank 3: {victim:?}");
        let status = Command::new("kill")
            .args(["-s", "STOP", &victim[0].to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let stopped = Instant::now();
        let o = job.wait_with_output().unwrap();
        let ended_s = stopped.elapsed().as_secs_f64();
        drop(group);
        let e = err(&o);
        assert!(!o.status.success(), "{e}");
        assert!(ended_s < 40.0, "the job ended {ended_s:.1} s after rank 3 stopped: {e}");
        let named = e.lines().any(|l| {
            l.starts_with("baton: rank ")
                && l.contains("lost or stalled")
                && ((l.contains("rank 3") && l.contains("replica 1, stage 1"))
                    || (l.contains("rank 2") && l.contains("replica 1, stage 0")))
        });
        assert!(named, "a rank names the stalled one: {e}");
        eprintln!("the job ended {ended_s:.1} s after rank 3 stopped (deadline 3 s)");
    }

    /// A non-finite value produced by a stage another rank runs is named by rank 0 as in one process, and every
    /// rank skips the same step.
    #[test]
    fn a_non_finite_value_on_another_rank_is_named_and_skipped_everywhere() {
        let m = model("3", "0");
        let layout = ["--stages", "2"];
        let fail = ("BATON_FAIL_AT", "stage:1,action:0,kind:nan,step:2");
        let out = tmp(SUITE, "nan-mpi");
        let o = mpirun(2)
            .env(fail.0, fail.1)
            .arg(env!("CARGO_BIN_EXE_baton"))
            .args(train_args(&layout, &m, &out))
            .output()
            .expect("mpirun runs");
        let e = err(&o);
        assert!(o.status.success(), "{e}");
        assert!(
            e.contains("non-finite loss (first seen on stage 1); optimizer step skipped"),
            "rank 0 names the stage rank 1 runs: {e}"
        );
        let skipped = std::fs::read_to_string(out.join("metrics.jsonl"))
            .expect("metrics")
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .filter(|l| l["skipped"] == true)
            .count();
        assert_eq!(skipped, 1, "{e}");
    }

    /// A bad rank count is refused by every rank with the reason, before anything is written.
    #[test]
    fn a_rank_count_that_does_not_fit_the_layout_is_refused() {
        let out = tmp(SUITE, "bad-ranks");
        let o = mpi_train(3, &["--stages", "2", "--data-parallel", "2"], &model("2", "0"), &out);
        assert!(!o.status.success());
        let e = err(&o);
        assert!(e.contains("cannot be spread evenly over 3 ranks"), "{e}");
        assert!(!out.join("checkpoints").exists(), "nothing is trained: {e}");
    }

    /// What runs in one process only for now is refused by every rank with the reason, before anything is trained.
    #[test]
    fn modes_that_run_in_one_process_only_are_refused_across_processes() {
        let dp = ["--stages", "1", "--data-parallel", "2"];
        for (name, flags, want) in [
            (
                "compress",
                [&dp[..], &["--compress", "bf16"]].concat(),
                "compressed reductions run in one process",
            ),
            (
                "diloco",
                [&dp[..], &["--sync", "diloco:4"]].concat(),
                "local SGD (DiLoCo) runs in one process",
            ),
            (
                "2bw",
                vec!["--stages", "2", "--schedule", "2bw"],
                "PipeDream-2BW runs in one process",
            ),
        ] {
            let out = tmp(SUITE, &format!("refused-{name}"));
            let o = mpi_train(2, &flags, &model("2", "0"), &out);
            let e = err(&o);
            assert!(!o.status.success(), "{name}: {e}");
            assert!(e.contains("baton: rank ") && e.contains(want), "{name}: {e}");
            assert!(!out.join("checkpoints").exists(), "{name}: nothing is trained: {e}");
        }
    }

    /// (e) A rank killed mid-run: mpirun ends every rank within a bound, and `baton launch --max-restarts 1` names
    /// the lost rank with its replica and stage, resumes from the newest checkpoint and ends bitwise equal to an
    /// uninterrupted single-process run.
    #[test]
    fn a_killed_rank_ends_the_job_and_launch_restarts_it_bitwise() {
        let m = model("300", "20");
        let layout = ["--stages", "2", "--data-parallel", "2"];
        let out = tmp(SUITE, "killed");
        let mut job = vec![
            "launch".to_string(),
            "--max-restarts".into(),
            "1".into(),
            "--restart-delay".into(),
            "0.1".into(),
            "--".into(),
            "mpirun".into(),
            "--allow-run-as-root".into(),
            "--oversubscribe".into(),
            "-np".into(),
            "4".into(),
            env!("CARGO_BIN_EXE_baton").into(),
        ];
        job.extend(train_args(&layout, &m, &out));
        let launch = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(&job)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        // Whatever happens below, the launcher's whole process group (mpirun and its ranks) goes with the test.
        let group = KillGroup(launch.id());
        // Once the first checkpoint is complete, kill the rank running replica 1's stage 1 (rank 3).
        let started = Instant::now();
        while !out.join("checkpoints").join("latest").is_file() {
            assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        let victim = rank_pids(&out, "3");
        assert_eq!(victim.len(), 1, "one process is rank 3: {victim:?}");
        let others: Vec<u32> = ["0", "1", "2"].iter().flat_map(|r| rank_pids(&out, r)).collect();
        assert_eq!(others.len(), 3, "{others:?}");
        let killed_at = Instant::now();
        let status = Command::new("kill")
            .args(["-9", &victim[0].to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        // Every other rank of that attempt is gone within the bound (mpirun ends them; the restart starts new ones).
        while others.iter().any(|&pid| alive(pid)) {
            assert!(
                killed_at.elapsed() < Duration::from_secs(30),
                "the other ranks {others:?} outlived the killed one by 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let gone_s = killed_at.elapsed().as_secs_f64();
        let o = launch.wait_with_output().unwrap();
        drop(group);
        let e = err(&o);
        eprintln!("every other rank ended {gone_s:.2} s after the kill");
        assert!(o.status.success(), "{e}");
        assert!(
            e.contains("baton launch: restart 1/1 after: lost rank 3 on ") && e.contains("replica 1, stage 1"),
            "the restart names the lost rank and its stage: {e}"
        );
        assert!(e.contains("the job finished after 1 restart(s)"), "{e}");
        let log = std::fs::read_to_string(out.join("restarts.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.contains("\"resume\":\"latest\""), "{log}");
        let single = single_process("killed-single", &layout, &m);
        same_checkpoint(&single, &out, 300);
        assert_eq!(
            metrics_losses(&single),
            metrics_losses(&out),
            "every step once, as uninterrupted"
        );
    }
}

/// Built without MPI, a `baton train` that a launcher started as one of several ranks refuses instead of training
/// N independent copies into one directory.
#[cfg(not(feature = "mpi"))]
#[test]
fn without_mpi_a_launched_rank_refuses() {
    let out = common::tmp("cli-mpi", "no-mpi");
    let out_s = out.display().to_string();
    let o = common::bin()
        .args(["train", "--steps", "1", "--out", &out_s])
        .env("OMPI_COMM_WORLD_SIZE", "4")
        .env("OMPI_COMM_WORLD_RANK", "1")
        .output()
        .unwrap();
    let e = common::err(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("built without MPI") && e.contains("--features mpi"), "{e}");
    assert!(!out.exists());
}

/// `baton launch` refuses what it cannot supervise, with one line and exit status 2, starting nothing.
#[test]
fn launch_refuses_a_job_it_cannot_restart() {
    for (args, want) in [
        (&["launch", "--", "echo", "hi"][..], "supervises a `baton train` job"),
        (
            &["launch", "--", "baton", "train", "--steps", "1"][..],
            "needs --out DIR",
        ),
        (
            &["launch", "--max-restarts", "5000", "--", "baton", "train", "--out", "x"][..],
            "--max-restarts 5000: at most 1000",
        ),
        (
            &["launch", "--restart-delay", "-1", "--", "baton", "train", "--out", "x"][..],
            "--restart-delay -1",
        ),
    ] {
        let o = common::bin().args(args).output().unwrap();
        let e = common::err(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{args:?}: {e}");
    }
}
