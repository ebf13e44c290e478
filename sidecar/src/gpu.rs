//! GPU telemetry through NVML, loaded at run time: utilisation and memory of
//! every GPU the container can see. A pod without a GPU, or without the
//! NVML library, gets `Unavailable` with the reason, and the sidecar keeps
//! working without GPU figures.

use std::sync::Arc;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

/// One GPU's figures at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuReading {
    /// NVML device index.
    pub index: u32,
    /// Device UUID (`GPU-…`), stable across reboots.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Share of the last sample period the GPU was busy, 0 to 1.
    pub utilization: f64,
    /// Device memory in use, bytes.
    pub memory_used: u64,
    /// Device memory in all, bytes.
    pub memory_total: u64,
}

/// Why GPU figures could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// There is no NVML to read from; the reason it is unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// The blocking task reading NVML failed.
    #[error("GPU read task: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// NVML could not count the devices.
    #[error("device count: {0}")]
    DeviceCount(#[source] NvmlError),
    /// A device could not be opened.
    #[error("GPU {index}: {source}")]
    Device {
        /// NVML device index.
        index: u32,
        /// What NVML said.
        source: NvmlError,
    },
    /// A device's utilisation could not be read.
    #[error("GPU {index} utilisation: {source}")]
    Utilization {
        /// NVML device index.
        index: u32,
        /// What NVML said.
        source: NvmlError,
    },
    /// A device's memory could not be read.
    #[error("GPU {index} memory: {source}")]
    Memory {
        /// NVML device index.
        index: u32,
        /// What NVML said.
        source: NvmlError,
    },
}

/// Where GPU figures come from.
#[derive(Clone)]
pub enum GpuTelemetry {
    /// NVML is loaded.
    Nvml(Arc<Nvml>),
    /// No figures, and why.
    Unavailable(String),
}

impl std::fmt::Debug for GpuTelemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GpuTelemetry::Nvml(_) => f.write_str("GpuTelemetry::Nvml"),
            GpuTelemetry::Unavailable(why) => write!(f, "GpuTelemetry::Unavailable({why})"),
        }
    }
}

impl GpuTelemetry {
    /// Loads NVML (`libnvidia-ml.so.1`, or `library` when given); never fails.
    pub fn open(library: Option<&std::path::Path>) -> Self {
        let opened = match library {
            Some(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
            None => Nvml::init(),
        };
        match opened {
            Ok(nvml) => match nvml.device_count() {
                Ok(0) => GpuTelemetry::Unavailable("NVML loaded but sees no GPU".into()),
                Ok(count) => {
                    tracing::info!(gpus = count, "GPU telemetry through NVML");
                    GpuTelemetry::Nvml(Arc::new(nvml))
                }
                Err(error) => GpuTelemetry::Unavailable(format!("NVML device count: {error}")),
            },
            Err(error) => GpuTelemetry::Unavailable(format!("NVML not loaded: {error}")),
        }
    }

    /// Whether figures can be read.
    pub fn is_available(&self) -> bool {
        matches!(self, GpuTelemetry::Nvml(_))
    }

    /// Reads every GPU; NVML calls block, so this runs on the blocking pool.
    pub async fn read(&self) -> Result<Vec<GpuReading>, GpuError> {
        let nvml = match self {
            GpuTelemetry::Nvml(nvml) => nvml.clone(),
            GpuTelemetry::Unavailable(why) => return Err(GpuError::Unavailable(why.clone())),
        };
        tokio::task::spawn_blocking(move || read_all(&nvml))
            .await
            .map_err(GpuError::Task)?
    }
}

fn read_all(nvml: &Nvml) -> Result<Vec<GpuReading>, GpuError> {
    let count = nvml.device_count().map_err(GpuError::DeviceCount)?;
    let mut readings = Vec::with_capacity(count as usize);
    for index in 0..count {
        let device = nvml
            .device_by_index(index)
            .map_err(|source| GpuError::Device { index, source })?;
        let utilization = device
            .utilization_rates()
            .map_err(|source| GpuError::Utilization { index, source })?;
        let memory = device
            .memory_info()
            .map_err(|source| GpuError::Memory { index, source })?;
        readings.push(GpuReading {
            index,
            uuid: device.uuid().unwrap_or_default(),
            name: device.name().unwrap_or_default(),
            utilization: f64::from(utilization.gpu.min(100)) / 100.0,
            memory_used: memory.used,
            memory_total: memory.total,
        });
    }
    Ok(readings)
}

/// The figures a load report carries for the whole pod: mean utilisation
/// and summed memory; `None` without readings.
pub fn pod_totals(readings: &[GpuReading]) -> Option<(f64, u64, u64)> {
    if readings.is_empty() {
        return None;
    }
    let utilization = readings.iter().map(|r| r.utilization).sum::<f64>() / readings.len() as f64;
    let used = readings.iter().map(|r| r.memory_used).sum();
    let total = readings.iter().map(|r| r.memory_total).sum();
    Some((utilization, used, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_reported_not_fatal() {
        let telemetry =
            GpuTelemetry::open(Some(std::path::Path::new("/nonexistent/libnvidia-ml.so.1")));
        assert!(!telemetry.is_available());
        let GpuTelemetry::Unavailable(why) = telemetry else {
            unreachable!()
        };
        assert!(why.contains("NVML"), "{why}");
    }

    #[test]
    fn pod_totals_average_utilisation_and_sum_memory() {
        let gpu = |index, utilization, used| GpuReading {
            index,
            uuid: format!("GPU-{index}"),
            name: "H100".into(),
            utilization,
            memory_used: used,
            memory_total: 80 << 30,
        };
        let totals = pod_totals(&[gpu(0, 0.5, 10 << 30), gpu(1, 1.0, 30 << 30)]);
        assert_eq!(totals, Some((0.75, 40 << 30, 160 << 30)));
        assert_eq!(pod_totals(&[]), None);
    }
}
