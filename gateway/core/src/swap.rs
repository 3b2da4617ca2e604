//! The swap cell: a value replaced as a whole at run time.

use std::sync::Arc;

/// A value replaced as a whole at run time (configuration reload): readers take a cheap
/// snapshot, writers swap in a new value; requests in flight keep the snapshot they took.
/// Long-lived holders can [`Swap::subscribe`] to hear of replacements.
#[derive(Debug)]
pub struct Swap<T> {
    value: std::sync::RwLock<Arc<T>>,
    replaced: tokio::sync::watch::Sender<u64>,
}

impl<T> Swap<T> {
    pub fn new(value: T) -> Self {
        Self {
            value: std::sync::RwLock::new(Arc::new(value)),
            replaced: tokio::sync::watch::channel(0).0,
        }
    }

    /// The current value.
    pub fn load(&self) -> Arc<T> {
        self.value.read().unwrap().clone()
    }

    /// Replaces the value for every later `load`, and tells every subscriber.
    pub fn store(&self, value: T) {
        *self.value.write().unwrap() = Arc::new(value);
        self.replaced.send_modify(|n| *n += 1);
    }

    /// A receiver that changes whenever the value is replaced.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.replaced.subscribe()
    }
}
