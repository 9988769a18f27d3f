//! Linux facts: `/proc` for metrics, `nixos-version --json` (NixOS) or `/etc/os-release`.

use tokio_util::sync::CancellationToken;

use super::{OsFacts, limit, query};
use crate::dashboard::Metrics;
use crate::exec::Runner;

pub(super) async fn os_facts(runner: &Runner, cancel: &CancellationToken) -> OsFacts {
    if std::path::Path::new("/etc/NIXOS").exists() {
        let json = query(runner, cancel, "nixos-version", &["--json"]).await;
        let parsed: Option<serde_json::Value> = json.and_then(|j| serde_json::from_str(&j).ok());
        let field = |name: &str| {
            parsed
                .as_ref()
                .and_then(|v| v.get(name))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        return OsFacts {
            os_name: Some("NixOS".into()),
            os_version: limit(field("nixosVersion"), 50),
            nixpkgs_version: limit(field("nixpkgsRevision"), 64),
        };
    }
    let release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let version_id = release.lines().find_map(|l| {
        l.strip_prefix("VERSION_ID=")
            .map(|v| v.trim_matches('"').to_string())
    });
    OsFacts {
        os_name: Some("Linux".into()),
        os_version: limit(version_id, 50),
        nixpkgs_version: None,
    }
}

/// One `/proc` file kept open and read again from offset 0 with `pread`: a sample costs one
/// read per file instead of an open, a size probe, two reads and a close.
#[derive(Debug)]
struct ProcFile {
    file: Option<std::fs::File>,
    path: &'static str,
    buf: Vec<u8>,
}

/// The fields the sampler needs are all in a file's first lines.
const PROC_HEAD_BYTES: usize = 4096;

impl ProcFile {
    fn open(path: &'static str) -> Self {
        ProcFile {
            file: std::fs::File::open(path).ok(),
            path,
            buf: vec![0; PROC_HEAD_BYTES],
        }
    }

    /// The file's first [`PROC_HEAD_BYTES`] as text, or `None` when it cannot be read.
    fn head(&mut self) -> Option<&str> {
        use std::os::unix::fs::FileExt as _;
        if self.file.is_none() {
            // Opened lazily again if it was missing at start (a /proc mounted late).
            self.file = std::fs::File::open(self.path).ok();
        }
        let len = match self.file.as_ref()?.read_at(&mut self.buf, 0) {
            Ok(len) => len,
            Err(_) => {
                self.file = None;
                return None;
            }
        };
        std::str::from_utf8(&self.buf[..len]).ok()
    }
}

/// CPU counters from the previous sample, for the busy share in between.
#[derive(Debug)]
pub(super) struct Sampler {
    last: Option<(u64, u64)>,
    stat: ProcFile,
    meminfo: ProcFile,
    loadavg: ProcFile,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::new()
    }
}

impl Sampler {
    pub(super) fn new() -> Self {
        let mut stat = ProcFile::open("/proc/stat");
        Sampler {
            last: stat.head().and_then(cpu_counters),
            stat,
            meminfo: ProcFile::open("/proc/meminfo"),
            loadavg: ProcFile::open("/proc/loadavg"),
        }
    }

    pub(super) fn sample(&mut self) -> Option<Metrics> {
        let counters = self.stat.head().and_then(cpu_counters);
        let cpu = match (self.last, counters) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
                self.last = Some((busy1, total1));
                (busy1.saturating_sub(busy0)) as f64 * 100.0 / (total1 - total0) as f64
            }
            (_, now) => {
                self.last = now;
                0.0
            }
        };
        let meminfo = self.meminfo.head()?;
        let kib = |name: &str| -> Option<f64> {
            meminfo.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse().ok()
            })
        };
        let total = kib("MemTotal")?;
        let available = kib("MemAvailable")?;
        let swap_total = kib("SwapTotal").unwrap_or(0.0);
        let swap_free = kib("SwapFree").unwrap_or(0.0);
        let load = self.loadavg.head()?.split_whitespace().next()?.to_string();
        Some(Metrics {
            cpu: round1(cpu),
            ram: round1(percent(total - available, total)),
            swap: round1(percent(swap_total - swap_free, swap_total)),
            load,
        })
    }
}

fn percent(used: f64, total: f64) -> f64 {
    if total > 0.0 {
        (used * 100.0 / total).clamp(0.0, 100.0)
    } else {
        0.0
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// (busy, total) jiffies from the aggregate `cpu` line of /proc/stat.
fn cpu_counters(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let mut fields = [0u64; 8];
    let mut count = 0;
    for (slot, field) in fields.iter_mut().zip(line.split_whitespace()) {
        *slot = field.parse().ok()?;
        count += 1;
    }
    if count < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is already in user).
    let total: u64 = fields.iter().sum();
    let idle = fields[3] + fields[4];
    Some((total - idle, total))
}

/// This boot's id (changes on every boot): `/proc/sys/kernel/random/boot_id`.
pub(super) fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_counters_read_the_aggregate_line() {
        let stat = "cpu  100 5 50 800 20 1 2 3 0 0\ncpu0 50 2 25 400 10 0 1 1 0 0\nintr 1 2 3\n";
        // busy = user+nice+system+irq+softirq+steal; total adds idle and iowait.
        assert_eq!(cpu_counters(stat), Some((161, 981)));
        assert_eq!(cpu_counters("cpu  1 2\n"), None);
        assert_eq!(cpu_counters("cpu0 1 2 3 4\n"), None);
        assert_eq!(cpu_counters("cpu  1 2 x 4\n"), None);
    }

    #[test]
    fn a_kept_open_proc_file_reads_fresh_content_each_time() {
        let mut stat = ProcFile::open("/proc/stat");
        let first = cpu_counters(stat.head().expect("/proc/stat")).expect("cpu line");
        // Burn a little CPU so the counters move.
        let until = std::time::Instant::now() + std::time::Duration::from_millis(30);
        while std::time::Instant::now() < until {
            std::hint::black_box(0u64);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = cpu_counters(stat.head().expect("/proc/stat")).expect("cpu line");
        assert!(
            second.1 > first.1,
            "total jiffies moved: {first:?} -> {second:?}"
        );
        let mut sampler = Sampler::new();
        let metrics = sampler.sample().expect("a sample on Linux");
        assert!(metrics.ram > 0.0 && metrics.ram <= 100.0, "{metrics:?}");
        assert!(!metrics.load.is_empty());
    }
}
