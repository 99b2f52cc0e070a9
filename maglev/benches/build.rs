//! Maglev table build time. Run with `cargo bench -p maglev`; prints the median and spread of
//! repeated builds for each (M, N).
use maglev::{Backend, Maglev};
use std::time::Instant;

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let cases: &[(u32, usize)] = if smoke { &[(251, 3)] } else { &[(4093, 10), (16381, 100), (65521, 100), (65521, 1000), (131071, 1000)] };
    let runs = if smoke { 3 } else { 21 };
    println!("| M | N | median ms | min ms | max ms | runs |");
    println!("|---|---|---|---|---|---|");
    for &(m, n) in cases {
        let keys: Vec<String> = (0..n).map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256)).collect();
        let backends: Vec<Backend<'_, u32>> =
            keys.iter().enumerate().map(|(i, k)| Backend { id: i as u32, key: k.as_bytes(), weight: 1 }).collect();
        let maglev = Maglev::new(m, 0).expect("size from the list");
        let mut times: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let table = maglev.build(&backends).expect("valid input");
                std::hint::black_box(table);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(|a, b| a.total_cmp(b));
        println!("| {m} | {n} | {:.3} | {:.3} | {:.3} | {runs} |", times[runs / 2], times[0], times[runs - 1]);
    }
}
