//! The benchmark harness in smoke mode (tiny sizes, few repeats), so it cannot rot. It checks
//! that every suite ran and produced its table and plots, not what the numbers are.
use std::{path::Path, process::Command};

#[test]
fn every_suite_runs_and_writes_its_results() {
    let bench = Path::new(env!("CARGO_BIN_EXE_lb-bench"));
    let agent = bench.parent().unwrap().join("lb-agent");
    assert!(agent.exists(), "{} is missing: run the tests from the workspace root (cargo test builds it)", agent.display());
    let out = std::env::temp_dir().join(format!("lb-bench-smoke-{}", std::process::id()));
    let run = Command::new(bench).arg("--smoke").arg("--out").arg(&out).arg("--agent-bin").arg(&agent).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{text}");
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for heading in ["## Maglev table build", "## Per-packet cost", "## Per-packet cost by path, single runs, beside a baseline", "## Per-packet cost of NetworkPolicy", "## Three dataplanes, one topology", "Ratios, same run", "## Node processes through the socket hook", "## Control plane at scale"] {
        assert!(md.contains(heading), "{heading} missing:\n{md}");
    }
    for dataplane in ["lb (XDP/TC)", "iptables", "nftables"] {
        assert_eq!(md.matches(&format!("| {dataplane} |")).count(), 2, "{dataplane}: one row per size:\n{md}");
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for row in json["dataplanes"].as_array().unwrap() {
        assert!(row["conns_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    // The control plane in both modes, every edit seen in the maps.
    for row in json["control_plane"].as_array().unwrap() {
        assert!(row["cold_start_s"].as_f64().unwrap() > 0.0 && row["edits"].as_u64().unwrap() > 0, "{row}");
    }
    assert_eq!(json["control_plane"].as_array().unwrap().len(), 2);
    // Every path by the kernel's clock and by the wall clock, beside the baseline (in a smoke
    // run, this build's own object).
    for row in json["cost"].as_array().unwrap() {
        assert!(row["ns"].as_f64().is_some() && row["wall_ns"].as_f64().unwrap() > 0.0 && row["baseline_wall_ns"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(md.contains("The same runs by the wall clock"), "{md}");
    for png in ["packet_cost.png", "conns_per_s.png", "latency_p99.png", "update_ms.png"] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png} is a PNG");
    }
    std::fs::remove_dir_all(&out).unwrap();
}

/// The map-cost suite on its object, built as its README section says: every work row measured,
/// and each load's maps found holding exactly the keys its runs inserted (the suite checks).
#[test]
fn map_cost_suite_builds_its_object_and_runs() {
    let bench = Path::new(env!("CARGO_BIN_EXE_lb-bench"));
    let out = std::env::temp_dir().join(format!("lb-bench-map-cost-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let object = out.join("map-cost.o");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("maps/build.sh");
    let built = Command::new("bash").arg(&script).arg(&object).output().unwrap();
    assert!(built.status.success(), "{}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(bench).args(["--smoke", "--suites", "map-cost", "--map-object"]).arg(&object).arg("--out").arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{text}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows = json["map_cost"].as_array().unwrap();
    assert_eq!(rows.len(), 8, "{rows:?}");
    let katran = rows.iter().find(|r| r["work"].as_str().unwrap().starts_with("Katran")).unwrap();
    assert_eq!(katran["katran_ratio"].as_f64(), Some(1.0));
    for row in rows {
        assert!(row["ns"].as_f64().is_some() && row["repeat_ns"].as_f64().is_some(), "{row}");
    }
    std::fs::remove_dir_all(&out).unwrap();
}
