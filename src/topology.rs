//! CPU topology: how many insert shards to run, and on which cores.
//! By default read from /sys; with the `hwloc` feature, from hwloc.

use crate::config::Config;

/// Online CPUs, as listed in /sys/devices/system/cpu/online ("0-3,6").
pub fn online_cpus() -> Vec<usize> {
    #[cfg(feature = "hwloc")]
    if let Some(cpus) = hwloc_cpus() {
        return cpus;
    }
    std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .and_then(|s| parse_cpu_list(&s))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            (0..std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1))
                .collect()
        })
}

/// Parses the kernel's CPU list format: "0-3,6,8-9".
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if a > b {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().ok()?),
        }
    }
    Some(out)
}

/// Pins the calling thread to `cpu`; false if the kernel refused.
pub fn pin_current_thread(cpu: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: cpu })
}

/// Insert slots to create: `insert_shards`, or one per CPU of
/// `cpu_affinity`, or one per online CPU.
pub fn insert_shards(cfg: &Config) -> usize {
    if cfg.insert_shards > 0 {
        cfg.insert_shards as usize
    } else if !cfg.cpu_affinity.is_empty() {
        cfg.cpu_affinity.len()
    } else {
        online_cpus().len().max(1)
    }
}

#[cfg(feature = "hwloc")]
fn hwloc_cpus() -> Option<Vec<usize>> {
    use hwlocality::object::types::ObjectType;
    use hwlocality::Topology;
    let topo = Topology::new().ok()?;
    let cpus: Vec<usize> = topo
        .objects_with_type(ObjectType::PU)
        .filter_map(|pu| pu.os_index())
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,6\n"), Some(vec![0, 1, 2, 3, 6]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert!(!online_cpus().is_empty());
    }

    /// With the feature on, hwloc and /sys must agree on the online CPUs.
    #[cfg(feature = "hwloc")]
    #[test]
    fn hwloc_agrees_with_sys() {
        let sys =
            parse_cpu_list(&std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap())
                .unwrap();
        assert_eq!(hwloc_cpus().expect("hwloc topology"), sys);
    }
}
