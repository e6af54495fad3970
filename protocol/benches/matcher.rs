//! The matcher benchmark: the compiled policy against a naive linear scan and the `globset` crate.
//!
//! Rule mixes are 40% exact files, 40% `dir\**` and 20% `dir\**\*.ext`, at 10, 1,000, 10,000 and 100,000 rules;
//! 100,000 UTF-16 paths of about 64 characters in mixed case, about 5% of which match. Each iteration matches one
//! path (cycling through them), so the reported time is the mean per path. The naive scan (the reference matcher)
//! runs on the same cycle but takes so long per path at large rule counts that criterion samples fewer of them.
//! The setup prints the compiled policy's memory per rule and its compile time. `compiled_cache_resident` repeats
//! the compiled match on the first 4,096 paths only, so that the difference to `compiled` shows how much of the mean
//! is reading a new path from memory.
//!
//! Run with `cargo bench -p shunt-protocol --bench matcher`; `SHUNT_BENCH_GLOBSET_MAX=N` limits globset to rule
//! counts up to N (default 10,000: building a 100,000-pattern globset takes minutes and gigabytes).
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    missing_docs,
    reason = "benchmark setup: a panic is a failed run"
)]

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use shunt_protocol::{Access, CompiledPolicy, Method, RuleSpec, Volume, VolumeNames, reference};

const PATHS: usize = 100_000;
/// The paths of the cache-resident variant (about 0.5 MB of UTF-16).
const HOT_PATHS: usize = 4_096;
const SIZES: [usize; 4] = [10, 1_000, 10_000, 100_000];
const VOLUME: Volume = Volume::Letter(b'C');

/// A small deterministic generator (xorshift), so every run measures the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mixed_case(text: &str, rng: &mut Rng) -> String {
    text.chars().map(|c| if rng.next() & 1 == 0 { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() }).collect()
}

const EXTENSIONS: [&str; 4] = ["log", "txt", "dat", "cfg"];

/// The source of rule `i` (without the volume) and whether it is a directory pattern.
fn source(i: usize) -> String {
    let vendor = i % 97;
    match i % 5 {
        0 | 1 => format!(r"\Program Files\Vendor{vendor:02}\Product{i:06}\config\settings.ini"),
        2 | 3 => format!(r"\ProgramData\Vendor{vendor:02}\Cache{i:06}\**"),
        _ => format!(r"\Users\Shared\Vendor{vendor:02}\Logs{i:06}\**\*.{}", EXTENSIONS[i % 4]),
    }
}

fn rules(count: usize) -> Vec<RuleSpec> {
    (0..count)
        .map(|i| {
            let exact = i % 5 < 2;
            RuleSpec {
                name: format!("rule-{i}").encode_utf16().collect(),
                source: format!("C:{}", source(i)).encode_utf16().collect(),
                target: if exact { format!(r"D:\Overlay\f{i}.ini") } else { format!(r"D:\Overlay\d{i}") }
                    .encode_utf16()
                    .collect(),
                method: Method::Forward,
                access: Access::ReadOnly,
                process: None,
            }
        })
        .collect()
}

/// A path of about 64 characters that matches rule `i`.
fn matching_path(i: usize, rng: &mut Rng) -> String {
    let vendor = i % 97;
    let path = match i % 5 {
        0 | 1 => format!(r"\Program Files\Vendor{vendor:02}\Product{i:06}\config\settings.ini"),
        2 | 3 => format!(r"\ProgramData\Vendor{vendor:02}\Cache{i:06}\sub\item{}.bin", rng.below(1000)),
        _ => format!(r"\Users\Shared\Vendor{vendor:02}\Logs{i:06}\d\app.{}", EXTENSIONS[i % 4]),
    };
    mixed_case(&path, rng)
}

/// A path of about 64 characters that shares prefixes with the rules but matches none of them.
fn other_path(rng: &mut Rng) -> String {
    let vendor = rng.below(97);
    let n = rng.below(1_000_000);
    let path = match rng.below(4) {
        0 => format!(r"\Program Files\Vendor{vendor:02}\Product{n:06}\bin\library{n}.dll"),
        1 => format!(r"\ProgramData\Vendor{vendor:02}\Settings{n:06}\state\current.json"),
        2 => format!(r"\Users\Shared\Vendor{vendor:02}\Docs{n:06}\report\summary.docx"),
        _ => format!(r"\Windows\System32\DriverStore\FileRepository\pkg{n:06}\driver.sys"),
    };
    mixed_case(&path, rng)
}

fn paths(rule_count: usize, rng: &mut Rng) -> Vec<String> {
    (0..PATHS)
        .map(|_| if rng.below(100) < 5 { matching_path(rng.below(rule_count), rng) } else { other_path(rng) })
        .collect()
}

fn glob_of(source: &str) -> String {
    // globset uses `/` and treats `\` as an escape.
    source.replace('\\', "/")
}

fn bench(c: &mut Criterion) {
    let globset_max: usize =
        std::env::var("SHUNT_BENCH_GLOBSET_MAX").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let mut group = c.benchmark_group("match");
    group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for &size in &SIZES {
        let mut rng = Rng(0x5EED_0000 + size as u64);
        let specs = rules(size);
        let start = Instant::now();
        let policy = CompiledPolicy::new(&specs, VolumeNames::AllowDriveLetters).unwrap();
        let compile_time = start.elapsed();
        let footprint = policy.footprint();
        let text = paths(size, &mut rng);
        let utf16: Vec<Vec<u16>> = text.iter().map(|p| p.encode_utf16().collect()).collect();
        let matching = utf16.iter().filter(|p| policy.match_path(&VOLUME, p, None, false).unwrap().is_some()).count();
        eprintln!(
            "rules {size:>6}: compile {:>8.3} ms, structure {:>5} B/rule (strings {} B/rule), {:.1}% of paths match, mean path {} units",
            compile_time.as_secs_f64() * 1e3,
            footprint.structure / size,
            footprint.strings / size,
            matching as f64 * 100.0 / PATHS as f64,
            utf16.iter().map(Vec::len).sum::<usize>() / PATHS,
        );

        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("compiled", size), |b| {
            b.iter(|| {
                next = (next + 1) % PATHS;
                black_box(policy.match_path(&VOLUME, black_box(&utf16[next]), None, false).ok().flatten().is_some())
            });
        });
        // The same matcher on the first 4,096 paths only, which stay in cache: the matcher's own cost, without the
        // memory latency of reading a new path from a 13 MB set every time.
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("compiled_cache_resident", size), |b| {
            b.iter(|| {
                next = (next + 1) % HOT_PATHS;
                black_box(policy.match_path(&VOLUME, black_box(&utf16[next]), None, false).ok().flatten().is_some())
            });
        });
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("could_match", size), |b| {
            b.iter(|| {
                next = (next + 1) % PATHS;
                black_box(policy.could_match(&VOLUME, black_box(&utf16[next])))
            });
        });
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("linear", size), |b| {
            b.iter(|| {
                next = (next + 1) % PATHS;
                black_box(
                    reference::match_linear(&policy, &VOLUME, black_box(&utf16[next]), None, false).ok().flatten(),
                )
            });
        });
        if size <= globset_max {
            let start = Instant::now();
            let mut builder = globset::GlobSetBuilder::new();
            for i in 0..size {
                let glob = globset::GlobBuilder::new(&glob_of(&source(i)))
                    .case_insensitive(true)
                    .literal_separator(true)
                    .backslash_escape(false)
                    .build()
                    .unwrap();
                builder.add(glob);
            }
            let set = match builder.build() {
                Ok(set) => set,
                Err(error) => {
                    eprintln!("rules {size:>6}: globset cannot build: {error}");
                    continue;
                }
            };
            eprintln!("rules {size:>6}: globset build {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
            let slashed: Vec<String> = text.iter().map(|p| p.replace('\\', "/")).collect();
            let mut next = 0usize;
            let mut scratch = Vec::new();
            group.bench_function(BenchmarkId::new("globset", size), |b| {
                b.iter(|| {
                    next = (next + 1) % PATHS;
                    set.matches_into(black_box(slashed[next].as_str()), &mut scratch);
                    black_box(scratch.first().copied())
                });
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("compile");
    group.sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    for &size in &SIZES {
        let specs = rules(size);
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter(|| CompiledPolicy::new(black_box(&specs), VolumeNames::AllowDriveLetters).unwrap());
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
