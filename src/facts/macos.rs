//! macOS facts: `sw_vers` once at start, `~/.nix-profile/.nixpkgs-version`, and metrics from
//! sysctl and `getloadavg`. Not compiled on the Linux CI machine: kept small on purpose.
//!
//! CPU is approximated from the 1-minute load average divided by the core count (mach host
//! statistics would be exact but need bindings we do not carry); StaSysMo files are preferred
//! when present and fresh, as in v1.

use std::ffi::CString;

use tokio_util::sync::CancellationToken;

use super::{OsFacts, limit, query};
use crate::dashboard::Metrics;
use crate::exec::Runner;

pub(super) async fn os_facts(runner: &Runner, cancel: &CancellationToken) -> OsFacts {
    let version = query(runner, cancel, "sw_vers", &["-productVersion"]).await;
    let name = version.as_deref().map(|v| {
        let major: u32 = v
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        let codename = match major {
            11 => " Big Sur",
            12 => " Monterey",
            13 => " Ventura",
            14 => " Sonoma",
            15 => " Sequoia",
            26 => " Tahoe",
            _ => "",
        };
        format!("macOS{codename}")
    });
    let nixpkgs = std::env::var_os("HOME")
        .map(|home| std::path::PathBuf::from(home).join(".nix-profile/.nixpkgs-version"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string());
    OsFacts {
        os_name: limit(name, 50),
        os_version: limit(version, 50),
        nixpkgs_version: limit(nixpkgs, 64),
    }
}

#[derive(Debug, Default)]
pub(super) struct Sampler;

impl Sampler {
    pub(super) fn new() -> Self {
        Sampler
    }

    pub(super) fn sample(&mut self) -> Option<Metrics> {
        let mut loads = [0f64; 3];
        // SAFETY: getloadavg writes at most 3 doubles into the array we pass.
        let n = unsafe { libc::getloadavg(loads.as_mut_ptr(), 3) };
        if n < 1 {
            return None;
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let memsize = sysctl_u64("hw.memsize")? as f64;
        let page_size = sysctl_u64("hw.pagesize").unwrap_or(4096) as f64;
        let free_pages = sysctl_u64("vm.page_free_count").unwrap_or(0) as f64
            + sysctl_u64("vm.page_speculative_count").unwrap_or(0) as f64;
        let ram = 100.0 - (free_pages * page_size * 100.0 / memsize);
        Some(Metrics {
            cpu: ((loads[0] / cpus) * 100.0).clamp(0.0, 100.0).round(),
            ram: ram.clamp(0.0, 100.0).round(),
            swap: swap_percent().unwrap_or(0.0),
            load: format!("{:.2}", loads[0]),
        })
    }
}

fn sysctl_u64(name: &str) -> Option<u64> {
    let cname = CString::new(name).ok()?;
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: value/len describe a valid u64 buffer; sysctlbyname writes at most len bytes.
    let rc = unsafe {
        libc::sysctlbyname(
            cname.as_ptr(),
            (&mut value as *mut u64).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    // Some counters are 32-bit; the little-endian low bytes are then already in place.
    (rc == 0).then_some(if len == 4 { value & 0xffff_ffff } else { value })
}

fn swap_percent() -> Option<f64> {
    let cname = CString::new("vm.swapusage").ok()?;
    // SAFETY: xsw_usage is plain data; sysctlbyname fills at most len bytes.
    let mut usage: libc::xsw_usage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::xsw_usage>();
    let rc = unsafe {
        libc::sysctlbyname(
            cname.as_ptr(),
            (&mut usage as *mut libc::xsw_usage).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 || usage.xsu_total == 0 {
        return None;
    }
    Some((usage.xsu_used as f64 * 100.0 / usage.xsu_total as f64).round())
}

/// This boot's id: the boot time (`kern.boottime`), which changes on every boot.
pub(super) fn boot_id() -> Option<String> {
    let cname = CString::new("kern.boottime").ok()?;
    // SAFETY: timeval is plain data; sysctlbyname fills at most len bytes.
    let mut tv: libc::timeval = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::timeval>();
    let rc = unsafe {
        libc::sysctlbyname(
            cname.as_ptr(),
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0 && tv.tv_sec > 0).then(|| format!("boottime-{}.{:06}", tv.tv_sec, tv.tv_usec))
}
