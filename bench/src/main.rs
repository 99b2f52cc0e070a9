//! lb-bench: one entry point for every benchmark suite. Writes `results.md`, `results.json`
//! and PNG plots to the output directory, and removes every namespace, mount and process it
//! made. `--smoke` runs tiny sizes and few repeats (the test suite does, so this cannot rot).
mod control_plane;
mod cost;
mod katran;
mod mapcost;
mod packet;
mod plot;
mod policy;
mod rules;
mod socket;
mod stats;
mod traffic;

use std::{fmt::Write as _, path::PathBuf, time::Instant};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use stats::Summary;

#[derive(Parser)]
#[command(about = "Benchmarks of the load balancer, side by side with kube-proxy's iptables and nftables rules")]
struct Args {
    /// Tiny sizes and few repeats: checks that every suite runs, measures nothing.
    #[arg(long)]
    smoke: bool,
    /// Suites to run.
    #[arg(long, value_delimiter = ',', default_value = "maglev,packet,cost,policy,dataplanes,socket,control-plane")]
    suites: Vec<String>,
    /// The cost suite's baseline: another build's BPF object of the same map schema (for
    /// example the previous commit's `target/bpf/bpfel-unknown-none/release/lb-ebpf`),
    /// measured beside this build's in the same run. Without it, this build's alone (in a
    /// smoke run, this build's object stands in, to exercise the side-by-side code).
    #[arg(long)]
    baseline_object: Option<PathBuf>,
    /// Katran's balancer (`bench/katran/build.sh` builds it from a Katran checkout), measured
    /// by the cost suite beside this build on the same paths and packets.
    #[arg(long)]
    katran_object: Option<PathBuf>,
    /// The map-cost suite's object (`bench/maps/build.sh OUT` builds it): a new flow's map work
    /// alone, in maps shaped like lb_xdp's and Katran's. The suite runs only when asked for.
    #[arg(long)]
    map_object: Option<PathBuf>,
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    out: PathBuf,
    /// Service counts of the control-plane suite [default: 1000,10000,100000].
    #[arg(long, value_delimiter = ',')]
    control_plane_sizes: Option<Vec<usize>>,
    /// Modes of the control-plane suite.
    #[arg(long, value_delimiter = ',', default_value = "standalone,kubernetes")]
    control_plane_modes: Vec<String>,
    /// The lb-agent binary [default: next to this one].
    #[arg(long)]
    agent_bin: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    plot::register_font()?;
    let started = Instant::now();
    let mut md = String::new();
    let mut js = serde_json::Map::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim().to_string();
    let cpus = std::thread::available_parallelism()?.get();
    writeln!(md, "# Benchmark results\n\nKernel {kernel}; CPU: {cpu} ({cpus} CPUs); {}.\n", if args.smoke { "SMOKE RUN (tiny sizes, not a measurement)" } else { "full run" })?;
    js.insert("machine".into(), json!({"kernel": kernel, "cpu": cpu, "cpus": cpus, "smoke": args.smoke}));

    if args.suites.iter().any(|s| s == "maglev") {
        maglev_suite(&args, &mut md, &mut js)?;
    }
    if args.suites.iter().any(|s| s == "packet") {
        packet_suite(&args, &mut md, &mut js)?;
    }
    if args.suites.iter().any(|s| s == "cost") {
        cost_suite(&args, &mut md, &mut js)?;
    }
    if args.suites.iter().any(|s| s == "map-cost") {
        map_cost_suite(&args, &mut md, &mut js)?;
    }
    if args.suites.iter().any(|s| s == "policy") {
        policy_suite(&args, &mut md, &mut js)?;
    }
    if args.suites.iter().any(|s| s == "dataplanes") {
        dataplane_suite(&args, &mut md, &mut js)?;
    }
    if args.suites.iter().any(|s| s == "socket") {
        socket_suite(&args, &mut md, &mut js)?;
    }
    if args.suites.iter().any(|s| s == "control-plane") {
        control_plane_suite(&args, &mut md, &mut js)?;
    }
    writeln!(md, "\nTotal time {:.0} s. Reproduce: `cargo run --release -p lb-bench` (as root).", started.elapsed().as_secs_f64())?;
    std::fs::write(args.out.join("results.md"), &md)?;
    std::fs::write(args.out.join("results.json"), serde_json::to_string_pretty(&js)?)?;
    print!("{md}");
    Ok(())
}

fn maglev_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let cases: &[(u32, usize)] = if args.smoke { &[(251, 3), (1021, 10)] } else { &[(4093, 10), (16381, 100), (65521, 100), (65521, 1000), (131071, 1000)] };
    let runs = if args.smoke { 3 } else { 21 };
    writeln!(md, "## Maglev table build\n\nTime to build one table, median of {runs} builds (min-max).\n\n| M | N | ms |\n|---|---|---|")?;
    let mut rows = Vec::new();
    for &(m, n) in cases {
        let keys: Vec<String> = (0..n).map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256)).collect();
        let backends: Vec<maglev::Backend<'_, u32>> = keys.iter().enumerate().map(|(i, k)| maglev::Backend { id: i as u32, key: k.as_bytes(), weight: 1 }).collect();
        let builder = maglev::Maglev::new(m, 0)?;
        let samples: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(builder.build(&backends)).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_, _>>()?;
        let s = Summary::of(&samples);
        writeln!(md, "| {m} | {n} | {} |", s.show(3))?;
        rows.push(json!({"m": m, "n": n, "ms": s.median, "min": s.min, "max": s.max, "runs": s.runs}));
    }
    js.insert("maglev".into(), json!(rows));
    Ok(())
}

fn packet_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let cfg = if args.smoke {
        packet::Config { sizes: vec![1, 100], repeat: 1000, single_runs: 200, runs: 2 }
    } else {
        packet::Config { sizes: vec![1, 1_000, 10_000, 100_000], repeat: 1_000_000, single_runs: 20_000, runs: 9 }
    };
    let rows = packet::run(&cfg)?;
    writeln!(
        md,
        "\n## Per-packet cost (BPF_PROG_TEST_RUN)\n\nns per packet, median of {} runs (min-max). `repeat`: {} iterations on the same packet (paths that leave it unchanged; the ct-hit path restores itself through two services that are each other's backend). `single`: {} runs of one iteration on distinct new flows, minus the XDP_PASS floor's single run.\n",
        cfg.runs, cfg.repeat, cfg.single_runs
    )?;
    let paths = sweep_table(md, "services", &cfg.sizes, &rows.iter().map(|r| (r.services, r.path, r.method, r.ns)).collect::<Vec<_>>())?;
    // Each IPv6 path beside its IPv4 twin: the ratio of each pair of runs measured side by
    // side, so drift on the machine during the run cancels out.
    writeln!(
        md,
        "\nIPv6 / IPv4: the ratio of each pair of runs measured side by side, median of {} pairs (min-max):\n\n| path |{} largest |\n|---|{}---|",
        cfg.runs,
        cfg.sizes.iter().map(|n| format!(" {n} services |")).collect::<String>(),
        "---|".repeat(cfg.sizes.len())
    )?;
    let mut ratio_rows = Vec::new();
    for p in paths.iter().filter_map(|p| p.strip_prefix("IPv6 ")) {
        write!(md, "| {p} |")?;
        let mut largest = 0.0f64;
        for n in &cfg.sizes {
            let of = |path: &str| &rows.iter().find(|r| r.path == path && r.services == *n).unwrap().samples;
            let pairs: Vec<f64> = of(&format!("IPv6 {p}")).iter().zip(of(p)).map(|(v6, v4)| v6 / v4).collect();
            let ratio = Summary::of(&pairs);
            largest = largest.max(ratio.median);
            write!(md, " {} |", ratio.show(2))?;
            ratio_rows.push(json!({"services": n, "path": p, "ratio": ratio.median, "min": ratio.min, "max": ratio.max, "runs": ratio.runs}));
        }
        writeln!(md, " {largest:.2} |")?;
    }
    js.insert("packet_ipv6_over_ipv4".into(), json!(ratio_rows));
    let series: Vec<(String, Vec<(usize, Summary)>)> = paths.iter().map(|p| (p.to_string(), rows.iter().filter(|r| r.path == *p).map(|r| (r.services, r.ns)).collect())).collect();
    plot::lines(&args.out.join("packet_cost.png"), "Per-packet cost vs configured services", "ns per packet", &series, false)?;
    let overhead = packet::event_overhead(&cfg)?;
    writeln!(md, "\nFlow events off, drops only (the default) and all (new connections too), at 1 service, runs rotating; the ratios are medians of the ratio of each set of runs (min-max):\n\n| path | off ns | drops ns | all ns | drops / off | all / off |\n|---|---|---|---|---|---|")?;
    for o in &overhead {
        writeln!(md, "| {} | {} | {} | {} | {} | {} |", o.path, o.off.show(1), o.drops.show(1), o.all.show(1), o.drops_ratio.show(3), o.all_ratio.show(3))?;
    }
    js.insert("packet_events".into(), json!(overhead.iter().map(|o| json!({"path": o.path, "off": o.off.median, "drops": o.drops.median, "all": o.all.median, "drops_ratio": o.drops_ratio.median, "all_ratio": o.all_ratio.median})).collect::<Vec<_>>()));
    writeln!(md, "\n![per-packet cost](packet_cost.png)")?;
    js.insert("packet".into(), json!(rows.iter().map(|r| json!({"services": r.services, "path": r.path, "method": r.method, "ns": r.ns.median, "min": r.ns.min, "max": r.ns.max, "runs": r.ns.runs})).collect::<Vec<_>>()));
    Ok(())
}

/// A table of paths (rows, in first-seen order) by size (columns) of (size, path, method, ns)
/// rows, with the largest size's median over the smallest's; returns the paths.
fn sweep_table<'a>(md: &mut String, unit: &str, sizes: &[usize], rows: &[(usize, &'a str, &str, Summary)]) -> Result<Vec<&'a str>> {
    let mut paths: Vec<&str> = Vec::new();
    for (_, path, _, _) in rows {
        if !paths.contains(path) {
            paths.push(path);
        }
    }
    write!(md, "| path | method |")?;
    for n in sizes {
        write!(md, " {n} {unit} |")?;
    }
    writeln!(md, " largest / 1 |\n|---|---|{}---|", "---|".repeat(sizes.len()))?;
    let (first, last) = (sizes[0], sizes[sizes.len() - 1]);
    for p in &paths {
        let of = |n: usize| rows.iter().find(|r| r.1 == *p && r.0 == n).expect("every path at every size");
        write!(md, "| {p} | {} |", of(first).2)?;
        for n in sizes {
            write!(md, " {} |", of(*n).3.show(1))?;
        }
        writeln!(md, " {:.2} |", of(last).3.median / of(first).3.median)?;
    }
    Ok(paths)
}

fn map_cost_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let path = args.map_object.as_ref().context("the map-cost suite needs --map-object (bench/maps/build.sh OUT builds it)")?;
    let object = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = if args.smoke {
        mapcost::Config { sizes: vec![1024], samples: 2, loads: 2, batch: 20, repeat: 100 }
    } else {
        mapcost::Config { sizes: vec![32_768, 1_048_576], samples: 24, loads: 3, batch: 500, repeat: 2_000 }
    };
    let rows = mapcost::run_suite(&cfg, &object)?;
    writeln!(
        md,
        "\n## A new flow's map work alone\n\n`{}`: every run or iteration on a key never used before. Maps shaped like lb_xdp's conntrack and reverse NAT (preallocated hash maps, 16-byte keys, 24- and 32-byte values) and Katran's flow cache (an LRU hash, 40-byte keys, 16-byte values), with `flows` entries. Single: per sample {} runs of `repeat = 1` (as the cost suite measures a new flow), each beside a run of the floor (the key counter alone), the median minus the floor's. Repeat: one run of `repeat = {}` per sample (a warm loop), its mean minus the floor's. {} samples; each program has loads of its own ({}), taken in turn, whose maps fill only with its own keys (checked). ns per new key, median of the samples (min-max); the ratio is to Katran's lookup and insert, of each sample's single runs.\n\n| flows | map work | single ns | / Katran's | repeat ns |\n|---|---|---|---|---|",
        path.display(),
        cfg.batch,
        cfg.repeat,
        cfg.samples,
        cfg.loads
    )?;
    for r in &rows {
        writeln!(md, "| {} | {} | {} | {} | {} |", r.flows, r.work, r.single.show(1), r.katran_ratio.show(2), r.repeat.show(1))?;
    }
    js.insert(
        "map_cost".into(),
        json!(rows.iter().map(|r| json!({"flows": r.flows, "work": r.work, "ns": r.single.median, "min": r.single.min, "max": r.single.max, "katran_ratio": r.katran_ratio.median, "katran_ratio_min": r.katran_ratio.min, "katran_ratio_max": r.katran_ratio.max, "repeat_ns": r.repeat.median})).collect::<Vec<_>>()),
    );
    Ok(())
}

fn cost_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let cfg = if args.smoke {
        cost::Config { sizes: vec![1], batch: 20, samples: 2, loads: 2, repeat: 1_000 }
    } else {
        cost::Config { sizes: vec![1, 100_000], batch: 500, samples: 12, loads: 3, repeat: 200_000 }
    };
    let (baseline, label) = match &args.baseline_object {
        Some(path) => (Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?), format!("`{}`", path.display())),
        None if args.smoke => (Some(lb_agent::dataplane::load::OBJECT.to_vec()), "this build's own object (smoke run)".to_string()),
        None => (None, "none given".to_string()),
    };
    let katran = args.katran_object.as_ref().map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display()))).transpose()?;
    let katran_label = args.katran_object.as_ref().map_or("not given".to_string(), |path| format!("`{}`", path.display()));
    let rows = cost::run(&cfg, baseline, katran)?;
    writeln!(
        md,
        "\n## Per-packet cost by path, single runs, beside a baseline and Katran\n\n`lb_xdp` (`lb_tc` for the TC paths), {} samples of {} runs of `repeat = 1` per path: each sample the median minus the median of the floor run the same way (the XDP_PASS program; for TC, `lb_tc` on an ARP frame); the programs' samples alternate, and each object is loaded {} times, its loads taking the samples in turn (where one load lands moves its figures by about one 10 ns step). ns, median of the samples (min-max); a ratio is of each pair of samples. Baseline: {label}. Katran: {katran_label} (every VIP packet IPIP-encapsulated to a real, XDP_TX; it has no reply path).\n\n| services | path | this build ns | baseline ns | this / baseline | Katran ns | this / Katran |\n|---|---|---|---|---|---|---|",
        cfg.samples, cfg.batch, cfg.loads
    )?;
    for r in &rows {
        let or_dash = |s: Option<Summary>, d: usize| s.map_or("-".to_string(), |s| s.show(d));
        writeln!(md, "| {} | {} | {} | {} | {} | {} | {} |", r.services, r.path, r.current.show(1), or_dash(r.baseline, 1), or_dash(r.ratio, 2), or_dash(r.katran, 1), or_dash(r.katran_ratio, 2))?;
    }
    writeln!(
        md,
        "\nThe same runs by the wall clock, system call included: what the kernel's clock leaves out (work a run defers, such as an allocator's refill) shows in the difference, beside about 2 µs of system call. ns per run: of each sample the mean (deferred work is done in bulk every so many runs), then the median of the samples (min-max); the difference is of each pair of samples.\n\n| services | path | this build ns | baseline ns | this - baseline ns |\n|---|---|---|---|---|"
    )?;
    for r in &rows {
        let or_dash = |s: Option<Summary>| s.map_or("-".to_string(), |s| s.show(0));
        writeln!(md, "| {} | {} | {} | {} | {} |", r.services, r.path, r.wall.show(0), or_dash(r.baseline_wall), or_dash(r.wall_difference))?;
    }
    writeln!(
        md,
        "\nThe paths that leave the packet as it was, by `repeat = {}` (every iteration takes the same path again; the single runs' 10 ns grain is gone): the kernel's mean ns of a run minus the floor's, 3 rounds on each load; Katran's the same where it passes the packet too (minus this build's floor); median (min-max).\n\n| services | path | this build ns | baseline ns | Katran ns |\n|---|---|---|---|---|",
        cfg.repeat
    )?;
    for r in rows.iter().filter(|r| r.repeat.is_some()) {
        let or_dash = |s: Option<Summary>| s.map_or("-".to_string(), |s| s.show(1));
        writeln!(md, "| {} | {} | {} | {} | {} |", r.services, r.path, or_dash(r.repeat), or_dash(r.baseline_repeat), or_dash(r.katran_repeat))?;
    }
    let median = |s: Option<Summary>| s.map(|s| s.median);
    js.insert(
        "cost".into(),
        json!(rows.iter().map(|r| json!({"services": r.services, "path": r.path, "ns": r.current.median, "min": r.current.min, "max": r.current.max, "baseline_ns": median(r.baseline), "ratio": median(r.ratio), "ratio_min": r.ratio.map(|s| s.min), "ratio_max": r.ratio.map(|s| s.max), "katran_ns": median(r.katran), "katran_ratio": median(r.katran_ratio), "katran_ratio_min": r.katran_ratio.map(|s| s.min), "katran_ratio_max": r.katran_ratio.map(|s| s.max), "wall_ns": r.wall.median, "baseline_wall_ns": median(r.baseline_wall), "wall_difference_ns": median(r.wall_difference), "repeat_ns": median(r.repeat), "baseline_repeat_ns": median(r.baseline_repeat), "katran_repeat_ns": median(r.katran_repeat)})).collect::<Vec<_>>()),
    );
    Ok(())
}

fn policy_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let cfg = if args.smoke {
        policy::Config { policies: vec![1, 10], repeat: 1000, single_runs: 100, runs: 2 }
    } else {
        policy::Config { policies: vec![1, 100, 1_000], repeat: 1_000_000, single_runs: 2_000, runs: 9 }
    };
    let rows = policy::run(&cfg)?;
    writeln!(
        md,
        "\n## Per-packet cost of NetworkPolicy (BPF_PROG_TEST_RUN)\n\nA pod-to-pod TCP SYN under N NetworkPolicies (each selecting the server pod and allowing one client identity on TCP 80; the measured client is allowed by the first, and egress-isolated by one more). ns per packet, kernel-reported, median of {} runs (min-max). `repeat`: {} iterations on the same packet. `single`: the median of {} runs of one iteration, each a new flow. Not floor-subtracted.\n",
        cfg.runs, cfg.repeat, cfg.single_runs
    )?;
    sweep_table(md, "policies", &cfg.policies, &rows.iter().map(|r| (r.policies, r.path, r.method, r.ns)).collect::<Vec<_>>())?;
    js.insert("policy_packet".into(), json!(rows.iter().map(|r| json!({"policies": r.policies, "path": r.path, "method": r.method, "ns": r.ns.median, "min": r.ns.min, "max": r.ns.max, "runs": r.ns.runs})).collect::<Vec<_>>()));
    Ok(())
}

/// The traffic suites' settings: k6 scripts, the agent binary, a scratch directory.
fn traffic_config(args: &Args) -> Result<traffic::Config> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let agent_bin = match &args.agent_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.parent().context("binary dir")?.join("lb-agent"),
    };
    anyhow::ensure!(agent_bin.exists(), "{} is missing: build it first (cargo build --release --bins)", agent_bin.display());
    let work_dir = std::env::temp_dir().join(format!("lb-bench-{}", std::process::id()));
    Ok(if args.smoke {
        traffic::Config { sizes: vec![1, 10], runs: 1, duration: "1s".into(), vus: 4, rate: 50, k6_dir: root.join("k6"), agent_bin, work_dir }
    } else {
        traffic::Config { sizes: vec![1, 1_000, 10_000], runs: 5, duration: "5s".into(), vus: 16, rate: 200, k6_dir: root.join("k6"), agent_bin, work_dir }
    })
}

fn socket_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let cfg = traffic_config(args)?;
    let result = socket::run(&cfg);
    let _ = std::fs::remove_dir_all(&cfg.work_dir);
    let (rows, ratio) = result?;
    writeln!(
        md,
        "\n## Node processes through the socket hook\n\nk6 `churn.js` ({} VUs, {}, a new connection per request) in the node's own network namespace, to a ClusterIP (translated at connect by the cgroup hook) and straight to its one backend, interleaved. Median of {} runs (min-max).\n\n| target | new conns/s |\n|---|---|",
        cfg.vus, cfg.duration, cfg.runs
    )?;
    for r in &rows {
        writeln!(md, "| {} | {} |", r.target, r.conns_per_s.show(0))?;
    }
    writeln!(md, "\nClusterIP / backend, per run: {} (goal: within 5%, so >= 0.95).", ratio.show(3))?;
    js.insert("socket".into(), json!({"rows": rows.iter().map(|r| json!({"target": r.target, "conns_per_s": r.conns_per_s.median, "min": r.conns_per_s.min, "max": r.conns_per_s.max})).collect::<Vec<_>>(), "ratio": ratio.median, "ratio_min": ratio.min, "ratio_max": ratio.max}));
    Ok(())
}

fn dataplane_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let cfg = traffic_config(args)?;
    let work_dir = cfg.work_dir.clone();
    let result = traffic::run(&cfg);
    let _ = std::fs::remove_dir_all(&work_dir);
    let rows = result?;
    let ipt = std::process::Command::new("iptables").arg("-V").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
    writeln!(
        md,
        "\n## Three dataplanes, one topology\n\nOutside client -> node -> 3 backend pods (network namespaces, veth), traffic to the last of N Services. k6 `churn.js` ({} VUs, {}, a new connection per request) gives new connections/s; k6 `http-mix.js` ({} requests/s, new connection each) gives latency. Median of {} runs (min-max). Service change: median of {} runs. iptables: `{ipt}`.\n",
        cfg.vus, cfg.duration, cfg.rate, cfg.runs, cfg.runs.max(5)
    )?;
    writeln!(md, "| services | dataplane | new conns/s | p50 ms | p99 ms | failed requests | one Service change, ms | how |\n|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} of {} | {} | {} |",
            r.services,
            r.dataplane,
            r.conns_per_s.show(0),
            r.p50_ms.show(2),
            r.p99_ms.show(2),
            r.failed.0,
            r.failed.1,
            r.update_ms.show(3),
            r.update_method
        )?;
    }
    writeln!(md, "\nRatios, same run:\n\n| services | conns/s lb / iptables | conns/s lb / nftables | change: iptables-restore / lb | change: nft / lb |\n|---|---|---|---|---|")?;
    for n in &cfg.sizes {
        let of = |d: &str| rows.iter().find(|r| r.services == *n && r.dataplane == d).unwrap();
        let (lb, ipt, nft) = (of(traffic::DATAPLANES[0]), of(traffic::DATAPLANES[1]), of(traffic::DATAPLANES[2]));
        writeln!(
            md,
            "| {n} | {:.2} | {:.2} | {:.0} | {:.1} |",
            lb.conns_per_s.median / ipt.conns_per_s.median,
            lb.conns_per_s.median / nft.conns_per_s.median,
            ipt.update_ms.median / lb.update_ms.median,
            nft.update_ms.median / lb.update_ms.median
        )?;
    }
    let series = |f: fn(&traffic::Row) -> Summary| -> Vec<(String, Vec<(usize, Summary)>)> {
        traffic::DATAPLANES.iter().map(|d| (d.to_string(), rows.iter().filter(|r| r.dataplane == *d).map(|r| (r.services, f(r))).collect())).collect()
    };
    plot::lines(&args.out.join("conns_per_s.png"), "New TCP connections per second", "connections/s", &series(|r| r.conns_per_s), false)?;
    plot::lines(&args.out.join("latency_p99.png"), "Request latency p99 under a fixed load", "ms", &series(|r| r.p99_ms), false)?;
    plot::lines(&args.out.join("update_ms.png"), "Time to apply one Service change", "ms (log)", &series(|r| r.update_ms), true)?;
    writeln!(md, "\n![connections per second](conns_per_s.png)\n![p99 latency](latency_p99.png)\n![update time](update_ms.png)")?;
    js.insert(
        "dataplanes".into(),
        json!(rows
            .iter()
            .map(|r| json!({"services": r.services, "dataplane": r.dataplane, "conns_per_s": r.conns_per_s.median, "conns_min": r.conns_per_s.min, "conns_max": r.conns_per_s.max, "p50_ms": r.p50_ms.median, "p99_ms": r.p99_ms.median, "update_ms": r.update_ms.median, "update_method": r.update_method}))
            .collect::<Vec<_>>()),
    );
    Ok(())
}

fn control_plane_suite(args: &Args, md: &mut String, js: &mut serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let traffic = traffic_config(args)?;
    let cfg = if args.smoke {
        // 1,200 Services: a dozen manifest files, and lists the size of a small cluster.
        control_plane::Config { sizes: vec![1_200], edits: 5, churn_rates: vec![20], churn_for: std::time::Duration::from_secs(1), idle_for: std::time::Duration::from_secs(1), agent_bin: traffic.agent_bin, work_dir: traffic.work_dir }
    } else {
        control_plane::Config {
            sizes: args.control_plane_sizes.clone().unwrap_or_else(|| vec![1_000, 10_000, 100_000]),
            edits: 100,
            churn_rates: vec![10, 50, 100, 200, 500, 1000],
            churn_for: std::time::Duration::from_secs(5),
            idle_for: std::time::Duration::from_secs(30),
            agent_bin: traffic.agent_bin,
            work_dir: traffic.work_dir,
        }
    };
    let mut rows = Vec::new();
    for mode in control_plane::MODES.into_iter().filter(|m| args.control_plane_modes.iter().any(|a| a == m)) {
        for &n in &cfg.sizes {
            let row = control_plane::run_case(&cfg, mode, n);
            let _ = std::fs::remove_dir_all(cfg.work_dir.join(format!("{mode}-{n}")));
            rows.push(row.with_context(|| format!("control plane, {mode} mode, {n} Services"))?);
        }
    }
    let _ = std::fs::remove_dir_all(&cfg.work_dir);
    writeln!(
        md,
        "\n## Control plane at scale\n\nN Services, 3 endpoints each, a ClusterIP each and a NodePort on the first 30,000; standalone mode reads 100 Services (and their EndpointSlices) to a file, Kubernetes mode lists and watches the API server stand-in. Cold start: agent started to `/readyz` 200, every frontend then checked in `LB4_SVC_V1`. Edit to map: one EndpointSlice endpoint replaced (file rewritten, or object applied) until the Service's entry points at a table naming the new backend, {} edits one at a time. Churn: edits at a fixed rate for {:?} each, every one timed the same way; sustained is the highest rate with p99 under 100 ms. Idle CPU: utime + stime over {:?} with nothing changing. BPF maps: `memlock` of every map the agent holds (sized by `--max-services`, `--max-backends`, `--maglev-slots` for the cluster).\n",
        cfg.edits, cfg.churn_for, cfg.idle_for
    )?;
    writeln!(md, "| mode | Services | frontends | cold start s | edit p50 ms | edit p99 ms | sustained churn, edits/s (p99 < 100 ms) | RSS MiB | BPF maps MiB | idle CPU % |\n|---|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        let sustained = r.sustained().map(|(asked, done)| format!("{done:.0} (asked {asked})")).unwrap_or_else(|| "none tried met it".into());
        writeln!(md, "| {} | {} | {} | {:.2} | {:.1} | {:.1} | {} | {:.0} | {:.0} | {:.2} |", r.mode, r.services, r.frontends, r.cold_start_s, r.edit_p(0.5), r.edit_p(0.99), sustained, r.rss_mib, r.bpf_mib, r.idle_cpu_pct)?;
    }
    writeln!(md, "\nChurn, every rate tried (edits/s asked -> done, p99 ms, edits not in the maps within 10 s):\n")?;
    for r in &rows {
        let tried: Vec<String> = r.churn.iter().map(|(asked, done, p99, lost)| format!("{asked} -> {done:.0}/s p99 {p99:.1} ms{}", if *lost > 0 { format!(", {lost} lost") } else { String::new() })).collect();
        writeln!(md, "- {} {}: {}", r.mode, r.services, tried.join("; "))?;
    }
    js.insert(
        "control_plane".into(),
        json!(rows
            .iter()
            .map(|r| json!({"mode": r.mode, "services": r.services, "frontends": r.frontends, "cold_start_s": r.cold_start_s, "edit_p50_ms": r.edit_p(0.5), "edit_p99_ms": r.edit_p(0.99), "edits": r.edit_ms.len(),
                "churn": r.churn.iter().map(|(a, d, p, l)| json!({"asked": a, "done_per_s": d, "p99_ms": p, "lost": l})).collect::<Vec<_>>(),
                "rss_mib": r.rss_mib, "bpf_maps_mib": r.bpf_mib, "idle_cpu_pct": r.idle_cpu_pct}))
            .collect::<Vec<_>>()),
    );
    Ok(())
}
