//! Per-object exponential backoff with jitter for failed reconciles, shared by every
//! controller through the [`crate::context::Context`].

use kube::Resource;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    const BASE: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(300);

    /// The delay before the next attempt: 2 s doubling to 5 min, ±20 % jitter so objects
    /// failing together do not retry together.
    pub fn next(&self, key: &str) -> Duration {
        let failures = match self.failures.lock() {
            Ok(mut map) => {
                let count = map.entry(key.to_string()).or_insert(0);
                *count = count.saturating_add(1);
                *count
            }
            Err(_) => 1,
        };
        let exponent = failures.saturating_sub(1).min(10);
        let delay = Self::BASE.saturating_mul(1 << exponent).min(Self::MAX);
        delay.mul_f64(0.8 + 0.4 * fastrand::f64())
    }

    pub fn reset(&self, key: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(key);
        }
    }
}

pub fn key_of<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()).into_owned(),
        object.meta().namespace.clone().unwrap_or_default(),
        object.meta().name.clone().unwrap_or_default()
    )
}
