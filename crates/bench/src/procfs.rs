//! Readings from `/proc`: resident memory, CPU time, the open-files limit, and which process
//! listens on a TCP port, plus the start-up checks built on them. Linux only. Every reading is
//! an `Option`, because a report with a missing field is more useful than no report.
//!
//! The parsers take file contents, not paths, so tests can feed them fixed text.

use std::fs;

/// `sysconf(_SC_CLK_TCK)`. It is 100 on every Linux build we run on. Calling `sysconf` would
/// need `unsafe`, which this workspace forbids.
const CLK_TCK: f64 = 100.0;

/// `VmRSS` in KiB from the text of `/proc/PID/status`.
pub(crate) fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `utime + stime`, in clock ticks, from the text of `/proc/PID/stat`.
pub(crate) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // Field 2 (comm) is in parentheses and may contain spaces and ')'. The fields after the
    // last ')' start at field 3 (state), so utime (14) and stime (15) are at indexes 11 and 12.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The soft "Max open files" limit from the text of `/proc/PID/limits`. Returns `None` for "unlimited".
pub(crate) fn parse_open_files_soft(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Socket inodes listening on `port`, from the text of `/proc/net/tcp` or `/proc/net/tcp6`.
pub(crate) fn parse_listen_inodes(net_tcp: &str, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for line in net_tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
        if f.len() < 10 || f[3] != "0A" {
            continue;
        }
        let Some((_, hex_port)) = f[1].rsplit_once(':') else {
            continue;
        };
        if u16::from_str_radix(hex_port, 16) == Ok(port) {
            if let Ok(inode) = f[9].parse() {
                out.push(inode);
            }
        }
    }
    out
}

/// Per-core `(busy, total)` clock ticks from the text of `/proc/stat`, in core order. Busy is
/// everything but `idle` and `iowait`, so it includes softirq time and other processes.
pub(crate) fn parse_core_ticks(stat: &str) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(name) = f.next() else { continue };
        // "cpu" alone is the sum of all cores.
        if name.len() <= 3 || !name.starts_with("cpu") {
            continue;
        }
        // user nice system idle iowait irq softirq steal (guest time is already in user).
        let v: Vec<u64> = f.take(8).filter_map(|x| x.parse().ok()).collect();
        if v.len() < 5 {
            continue;
        }
        let total: u64 = v.iter().sum();
        out.push((total - v[3] - v[4], total));
    }
    out
}

/// Busy fraction of each core between two [`core_ticks`] readings.
pub(crate) fn busy_fractions(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(&(b0, t0), &(b1, t1))| {
            let total = t1.saturating_sub(t0);
            if total == 0 {
                0.0
            } else {
                (b1.saturating_sub(b0)) as f64 / total as f64
            }
        })
        .collect()
}

/// The host's per-core ticks now.
pub(crate) fn core_ticks() -> Option<Vec<(u64, u64)>> {
    Some(parse_core_ticks(&fs::read_to_string("/proc/stat").ok()?))
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// Resident set size in KiB of `pid`, or of this process for `None`.
pub(crate) fn rss_kb(pid: Option<u32>) -> Option<u64> {
    parse_vm_rss_kb(&fs::read_to_string(proc_path(pid, "status")).ok()?)
}

/// `Threads` from the text of `/proc/PID/status`.
pub(crate) fn parse_threads(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Threads of `pid`, or of this process for `None`.
pub(crate) fn threads(pid: Option<u32>) -> Option<u64> {
    parse_threads(&fs::read_to_string(proc_path(pid, "status")).ok()?)
}

/// Open file descriptors of `pid` (entries of `/proc/PID/fd`), or of this process for `None`.
pub(crate) fn fd_count(pid: Option<u32>) -> Option<u64> {
    Some(fs::read_dir(proc_path(pid, "fd")).ok()?.count() as u64)
}

/// User plus system CPU seconds used so far by `pid`, or by this process for `None`.
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let ticks = parse_cpu_ticks(&fs::read_to_string(proc_path(pid, "stat")).ok()?)?;
    Some(ticks as f64 / CLK_TCK)
}

/// This process's soft limit on open files.
pub(crate) fn open_files_soft_limit() -> Option<u64> {
    parse_open_files_soft(&fs::read_to_string("/proc/self/limits").ok()?)
}

/// The process that owns a socket listening on TCP `port`. To find it, this scans every
/// process's fds, which takes a few ms and needs permission to read them (we run as root).
pub(crate) fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            inodes.extend(parse_listen_inodes(&text, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// `--server-pid` (`explicit`), or else the process listening on the target port.
pub(crate) fn server_pid(explicit: Option<u32>, port: u16) -> Option<u32> {
    let pid = explicit.or_else(|| listener_pid(port));
    if pid.is_none() {
        eprintln!("bench: no --server-pid and no process found listening on port {port}; server readings will be null");
    }
    pid
}

/// Each connection is a file descriptor, and the bench cannot raise its own limit (no `unsafe`).
pub(crate) fn warn_if_fd_limit_low(connections: usize) {
    if let Some(limit) = open_files_soft_limit() {
        if connections as u64 + 64 > limit {
            eprintln!(
                "bench: {connections} connections need about as many open files, but the soft limit is {limit}; raise it with `ulimit -n`"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss() {
        let status =
            "Name:\tswitchboard\nVmPeak:\t  123456 kB\nVmRSS:\t   45678 kB\nRssAnon:\t 40000 kB\n";
        assert_eq!(parse_vm_rss_kb(status), Some(45678));
        assert_eq!(parse_vm_rss_kb("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn cpu_ticks_survive_odd_process_names() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1000 0 3 0 250 75 0 0 20 0 9 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

    #[test]
    fn cpu_ticks_of_this_process() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_kb(None).unwrap() > 0);
        assert!(threads(None).unwrap() >= 1);
        assert!(fd_count(None).unwrap() >= 3);
    }

    #[test]
    fn thread_count() {
        assert_eq!(
            parse_threads("Name:\tx\nThreads:\t17\nVmRSS:\t1 kB\n"),
            Some(17)
        );
        assert_eq!(parse_threads("Name:\tx\n"), None);
    }

    #[test]
    fn core_ticks_and_busy_fractions() {
        let before = "cpu  300 0 100 1000 10 0 50 0 0 0\n\
                      cpu0 200 0 50 400 5 0 40 0 0 0\n\
                      cpu1 100 0 50 600 5 0 10 0 0 0\n\
                      intr 12345\n";
        let after = "cpu0 290 0 60 400 5 0 50 0 0 0\n\
                     cpu1 110 0 50 690 5 0 10 0 0 0\n";
        let a = parse_core_ticks(before);
        assert_eq!(a, vec![(290, 695), (160, 765)]);
        let b = parse_core_ticks(after);
        let busy = busy_fractions(&a, &b);
        assert_eq!(busy, vec![1.0, 0.1]);
        assert!(core_ticks().is_some_and(|c| !c.is_empty()));
    }

    #[test]
    fn open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_open_files_soft(limits), Some(20000));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files_soft(unlimited), None);
    }

    #[test]
    fn listen_inodes() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 91234 1 0000000000000000 100 0 0 10 0\n\
           1: 0100007F:1F40 0200007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 91999 1 0000000000000000 20 4 30 10 -1\n\
           2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1717 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_listen_inodes(tcp, 8000), vec![91234]);
        assert_eq!(parse_listen_inodes(tcp, 22), vec![1717]);
        assert!(parse_listen_inodes(tcp, 9).is_empty());
    }

    #[test]
    fn finds_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
    }
}
