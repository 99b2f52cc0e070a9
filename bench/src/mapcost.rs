//! The kernel's hash-map work of a new flow, alone: `bench/maps/map-cost.bpf.c`, built by
//! `bench/maps/build.sh`. What a new flow's lookups and inserts cost in maps shaped like lb_xdp's
//! conntrack and reverse NAT and like Katran's flow cache, sized like the cost suite's, so that
//! the part of a new flow that is map work can be told from the rest.
//!
//! Every run or iteration of a program is on a key never used before (a counter in the object).
//! Each sample has, per program, `batch` single runs (`repeat = 1`, as the cost suite measures a
//! new flow), each beside a run of the floor (the counter alone): the median minus the floor's;
//! and one run of `repeat` iterations (a warm loop) minus the floor's. Each program has a load
//! of its own, so that its maps fill only with its own keys; the programs take turns within a
//! sample, and `loads` fresh loads take the samples in turn. After its samples, each load's maps
//! must hold exactly the keys its runs inserted.
use anyhow::{ensure, Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};

use crate::stats::Summary;

pub struct Config {
    /// Entries of each flow map (the cost suite's conntrack size, and larger).
    pub sizes: Vec<u32>,
    pub samples: usize,
    pub loads: usize,
    /// Single runs (`repeat = 1`, one new key each) per sample, each beside a run of the floor.
    pub batch: usize,
    /// New keys of the sample's `repeat` run.
    pub repeat: u32,
}

pub struct Row {
    pub flows: u32,
    pub work: &'static str,
    /// Single runs, as the cost suite measures a new flow: per sample, the median minus the
    /// floor's median.
    pub single: Summary,
    /// Of each sample: this row's single-run ns / Katran's lookup and insert.
    pub katran_ratio: Summary,
    /// One `repeat` run per sample (every iteration a new key, in a warm loop): its mean ns
    /// minus the floor's.
    pub repeat: Summary,
}

/// A program of the object: what it does for each new key, the flow maps it touches (sized to
/// the row's flows), and whether its keys stay in them.
struct Work {
    program: &'static str,
    name: &'static str,
    maps: &'static [&'static str],
    keeps: bool,
}

const FLOOR: &str = "floor_counter";
const KATRAN: &str = "katran_lookup_insert";
const FLOW_MAPS: [&str; 3] = ["conntrack", "reverse_nat", "katran_flows"];

const WORK: [Work; 9] = [
    Work { program: FLOOR, name: "floor (the key counter alone)", maps: &[], keeps: false },
    Work { program: "ct_lookup_miss", name: "conntrack lookup, a miss", maps: &["conntrack"], keeps: false },
    Work { program: "ct_insert", name: "conntrack insert", maps: &["conntrack"], keeps: true },
    Work { program: "ct_lookup_insert", name: "conntrack lookup (miss), then insert: a SYN's conntrack work", maps: &["conntrack"], keeps: true },
    Work { program: "rnat_ct_insert", name: "reverse-NAT insert, then conntrack insert", maps: &["reverse_nat", "conntrack"], keeps: true },
    Work { program: "ct_lookup_rnat_ct_insert", name: "conntrack lookup (miss), then both inserts: lb_xdp's new TCP flow", maps: &["reverse_nat", "conntrack"], keeps: true },
    Work { program: KATRAN, name: "Katran's flow cache (LRU): lookup (miss), then insert: Katran's new flow", maps: &["katran_flows"], keeps: true },
    Work { program: "ct_insert_delete", name: "conntrack insert, then delete (the next insert reuses the element)", maps: &["conntrack"], keeps: false },
    Work { program: "small_insert_delete", name: "insert, then delete, in a 64-entry map (nothing misses the cache)", maps: &[], keeps: false },
];

/// One program's load: the object with the flow maps it touches sized to `flows` (the others
/// to one entry, to keep memory down at large sizes).
fn load(object: &[u8], work: &Work, flows: u32) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for map in FLOW_MAPS {
        loader.map_max_entries(map, if work.maps.contains(&map) { flows } else { 1 });
    }
    let mut ebpf = loader.load(object).context("loading the map-cost object")?;
    let prog: &mut Xdp = ebpf.program_mut(work.program).with_context(|| format!("no {} in the map-cost object", work.program))?.try_into()?;
    prog.load().with_context(|| format!("verifier rejected {}", work.program))?;
    Ok(ebpf)
}

/// The kernel's mean ns per iteration of `repeat` iterations, each on a new key.
fn run(ebpf: &Ebpf, program: &str, repeat: u32) -> Result<f64> {
    let prog: &Xdp = ebpf.program(program).context(program.to_string())?.try_into()?;
    // Any packet: the programs read only their counter.
    let packet = [0u8; 64];
    let result = prog.test_run(TestRunOptions { data_in: Some(&packet), repeat, ..Default::default() }).context("BPF_PROG_TEST_RUN")?;
    ensure!(result.return_value == 2, "{program}: verdict {}, not XDP_PASS (a lookup found a key it should not have)", result.return_value);
    Ok(result.duration.as_nanos() as f64)
}

/// Keys in one of the flow maps (their key and value sizes as map-cost.bpf.c has them).
fn entries(ebpf: &Ebpf, map: &str) -> Result<usize> {
    let data = ebpf.map(map).with_context(|| format!("no map {map}"))?;
    let count = match map {
        "conntrack" => HashMap::<&MapData, [u32; 4], [u64; 3]>::try_from(data)?.keys().count(),
        "reverse_nat" => HashMap::<&MapData, [u32; 4], [u64; 4]>::try_from(data)?.keys().count(),
        "katran_flows" => HashMap::<&MapData, [u32; 10], [u64; 2]>::try_from(data)?.keys().count(),
        _ => anyhow::bail!("{map}: not a flow map of the object"),
    };
    Ok(count)
}

pub fn run_suite(cfg: &Config, object: &[u8]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &flows in &cfg.sizes {
        let (mut single, mut repeat) = (vec![Vec::new(); WORK.len()], vec![Vec::new(); WORK.len()]);
        for round in 0..cfg.loads {
            let loaded = WORK.iter().map(|work| load(object, work, flows)).collect::<Result<Vec<_>>>()?;
            let floor = &loaded[0];
            let mut keys = 0;
            for _ in (round..cfg.samples).step_by(cfg.loads) {
                for (i, (work, ebpf)) in WORK.iter().zip(&loaded).enumerate().skip(1) {
                    let (mut floors, mut runs) = (Vec::with_capacity(cfg.batch), Vec::with_capacity(cfg.batch));
                    for _ in 0..cfg.batch {
                        floors.push(run(floor, FLOOR, 1)?);
                        runs.push(run(ebpf, work.program, 1)?);
                    }
                    single[i].push(Summary::of(&runs).median - Summary::of(&floors).median);
                    repeat[i].push(run(ebpf, work.program, cfg.repeat)? - run(floor, FLOOR, cfg.repeat)?);
                }
                keys += cfg.batch + cfg.repeat as usize;
            }
            for (work, ebpf) in WORK.iter().zip(&loaded) {
                let expected = if work.keeps { keys } else { 0 };
                for map in work.maps {
                    let got = entries(ebpf, map)?;
                    ensure!(got == expected, "{}: {map} holds {got} entries, not {expected}", work.program);
                }
            }
        }
        let katran = WORK.iter().position(|w| w.program == KATRAN).expect("listed");
        for (i, work) in WORK.iter().enumerate().skip(1) {
            let ratio: Vec<f64> = single[i].iter().zip(&single[katran]).map(|(a, b)| a / b).collect();
            rows.push(Row { flows, work: work.name, single: Summary::of(&single[i]), katran_ratio: Summary::of(&ratio), repeat: Summary::of(&repeat[i]) });
        }
    }
    Ok(rows)
}
