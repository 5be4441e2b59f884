//! The `timings` measurements' helpers (ignored tests, run by hand): one operation timed, and a
//! table row of its count, p50, p90 and minimum in milliseconds.

use std::time::{Duration, Instant};

pub fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |i: usize| samples.get(i).copied().unwrap_or_default();
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
        samples.len(),
        ms(at(samples.len() / 2)),
        ms(at(samples.len() * 9 / 10)),
        ms(at(0)),
    );
}

pub fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let out = f();
    (start.elapsed(), out)
}
