//! Calibrates the datapath's state clock (`lb_common::StateClockV1`): how long a jiffy is
//! and where jiffies stand against CLOCK_MONOTONIC, from the probe program's readings of both.
//! With it, a packet's timestamp costs an inlined load instead of a helper call.
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::{StateClockV1, MAP_STATE_CLOCK};

/// The probe: writes jiffies and the coarse clock, read together, into the packet it passes.
pub const PROBE_PROGRAM: &str = "lb_clock_probe";
/// The tick rates a kernel can be built with (`CONFIG_HZ`).
const KERNEL_HZ: [u64; 4] = [100, 250, 300, 1000];
/// How long the tick rate is measured over: at 250 and 300 Hz, 12 and 15 ticks, told apart
/// despite a tick's uncertainty at each end.
const MEASURE_FOR: Duration = Duration::from_millis(60);

/// Measures the clock through the probe and writes it where the programs read it. Until this
/// is written they read `bpf_ktime_get_coarse_ns` instead, which keeps the same time.
pub fn calibrate(ebpf: &mut Ebpf) -> Result<StateClockV1> {
    let probe: &mut Xdp = ebpf.program_mut(PROBE_PROGRAM).context("no clock probe program")?.try_into()?;
    probe.load().context("loading the clock probe")?;
    let read = || -> Result<(u64, u64)> {
        let packet = [0u8; 64];
        let mut out = [0u8; 64];
        probe.test_run(TestRunOptions { data_in: Some(&packet), data_out: Some(&mut out), repeat: 1, ..Default::default() }).context("running the clock probe")?;
        let word = |at: usize| u64::from_ne_bytes(out[at..at + 8].try_into().expect("8 bytes"));
        Ok((word(0), word(8)))
    };
    let first = read()?;
    std::thread::sleep(MEASURE_FOR);
    let readings = (0..5).map(|_| read()).collect::<Result<Vec<_>>>()?;
    let clock = from_readings(first, &readings)?;
    let map = ebpf.map_mut(MAP_STATE_CLOCK).with_context(|| format!("no map {MAP_STATE_CLOCK}"))?;
    let mut map: Array<&mut MapData, StateClockV1> = map.try_into()?;
    map.set(0, &clock, 0).with_context(|| format!("writing {MAP_STATE_CLOCK}"))?;
    Ok(clock)
}

/// The clock from `(jiffies, coarse ns)` readings: the tick rate from the first to the last,
/// rounded to the nearest a kernel can have; the offset from each, the largest taken. The
/// kernel advances jiffies a moment before the coarse clock in the same tick, so a reading
/// between the two gives an offset one tick short.
fn from_readings(first: (u64, u64), later: &[(u64, u64)]) -> Result<StateClockV1> {
    let last = *later.last().context("no readings")?;
    let (ticks, ns) = (last.0.wrapping_sub(first.0), last.1.saturating_sub(first.1));
    ensure!(ticks > 0 && ns > 0, "jiffies or the coarse clock did not move in {ns} ns");
    let measured_hz = ticks as f64 * 1e9 / ns as f64;
    let hz = KERNEL_HZ.into_iter().min_by(|a, b| (*a as f64 - measured_hz).abs().total_cmp(&(*b as f64 - measured_hz).abs())).expect("a list");
    ensure!((hz as f64 - measured_hz).abs() <= 0.15 * hz as f64, "measured {measured_hz:.0} ticks a second, no kernel's tick rate");
    // The kernel's TICK_NSEC.
    let tick_ns = (1_000_000_000 + hz / 2) / hz;
    let offset_ns = later.iter().map(|(jiffies, ns)| ns.wrapping_sub(jiffies.wrapping_mul(tick_ns)) as i64).max().expect("readings") as u64;
    Ok(StateClockV1 { tick_ns, offset_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings of a 250 Hz kernel whose jiffies were 4,294,892,296 at boot.
    fn reading(ms: u64) -> (u64, u64) {
        let jiffies = 4_294_892_296 + ms / 4;
        (jiffies, ms / 4 * 4_000_000)
    }

    #[test]
    fn the_tick_rate_is_rounded_to_a_kernels_and_the_offset_maps_jiffies_to_the_clock() {
        let clock = from_readings(reading(1_000), &[reading(1_060), reading(1_061), reading(1_064)]).unwrap();
        assert_eq!(clock.tick_ns, 4_000_000);
        assert_eq!(clock.at(4_294_892_296 + 500), 500 * 4_000_000);
        // A reading caught between the jiffy and the clock's update (one tick short) is outvoted.
        let (j, ns) = reading(1_068);
        let clock = from_readings(reading(1_000), &[(j + 1, ns), reading(1_072)]).unwrap();
        assert_eq!(clock.at(j), ns);
        // 300 Hz: 3,333,333 ns a tick, as the kernel rounds it.
        let clock = from_readings((0, 0), &[(18, 60_000_000)]).unwrap();
        assert_eq!(clock.tick_ns, 3_333_333);
    }

    #[test]
    fn readings_that_fit_no_tick_rate_are_refused() {
        assert!(from_readings((0, 0), &[(0, 60_000_000)]).is_err(), "jiffies stood still");
        assert!(from_readings((0, 0), &[(30, 60_000_000)]).is_err(), "500 Hz is no kernel's");
    }
}
