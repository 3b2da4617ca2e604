//! The in-flight budget: bytes a gateway holds for producers (request bodies being read, events
//! waiting for the log) are bounded by configuration, not by load.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::Rejection;

/// How long producers are told to wait when the budget is used up.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A shared pool of bytes (or of any unit: connections, requests). Cheap to clone; resizable at
/// run time.
#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: Arc<AtomicUsize>,
}

/// Bytes held from a [`Budget`]; they return to it when this is dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    budget: Budget,
}

fn exhausted() -> Rejection {
    Rejection::unavailable(
        RETRY_AFTER,
        "the log is not keeping up: the gateway's in-flight budget is exhausted",
    )
}

impl Budget {
    /// A budget of `total` bytes.
    pub fn new(total: u64) -> Self {
        let total = (total as usize).min(Semaphore::MAX_PERMITS);
        Self {
            sem: Arc::new(Semaphore::new(total)),
            total: Arc::new(AtomicUsize::new(total)),
        }
    }

    /// Configured size.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Bytes currently held.
    pub fn in_use(&self) -> usize {
        self.total().saturating_sub(self.sem.available_permits())
    }

    /// Changes the size. Growing takes effect at once; shrinking removes free room at once and
    /// the rest as holders release it (nothing already held is taken back).
    pub fn set_total(&self, total: u64) {
        let new = (total as usize).min(Semaphore::MAX_PERMITS);
        let old = self.total.swap(new, Ordering::Relaxed);
        if new > old {
            self.sem.add_permits(new - old);
        } else if new < old {
            let mut debt = old - new;
            debt -= self.sem.forget_permits(debt);
            if debt > 0 {
                let sem = self.sem.clone();
                tokio::spawn(async move {
                    if let Ok(p) = sem.acquire_many_owned(debt as u32).await {
                        p.forget();
                    }
                });
            }
        }
    }

    /// A reservation holding nothing.
    pub fn empty(&self) -> Reservation {
        Reservation {
            permit: None,
            budget: self.clone(),
        }
    }

    /// Holds `bytes` now or fails with 503-style `Unavailable`. A request larger than the whole
    /// budget takes all of it rather than waiting for room that can never exist.
    pub fn try_reserve(&self, bytes: usize) -> Result<Reservation, Rejection> {
        let mut r = self.empty();
        r.resize(bytes)?;
        Ok(r)
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Grows or shrinks to `bytes` (capped at the budget's size). Growing fails with
    /// `Unavailable` when the budget has no room; the bytes already held stay held.
    pub fn resize(&mut self, bytes: usize) -> Result<(), Rejection> {
        let want = bytes.min(self.budget.total());
        let have = self.bytes();
        if want > have {
            let more = u32::try_from(want - have).map_err(|_| exhausted())?;
            let extra = self
                .budget
                .sem
                .clone()
                .try_acquire_many_owned(more)
                .map_err(|_| exhausted())?;
            match &mut self.permit {
                Some(p) => p.merge(extra),
                None => self.permit = Some(extra),
            }
        } else if want < have
            && let Some(p) = &mut self.permit
        {
            drop(p.split(have - want));
        }
        Ok(())
    }

    /// Splits off `bytes` (at most all held) into a reservation of their own.
    pub fn split(&mut self, bytes: usize) -> Reservation {
        let n = bytes.min(self.bytes());
        Reservation {
            permit: self.permit.as_mut().and_then(|p| p.split(n)),
            budget: self.budget.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_grow_shrink_split_and_return_on_drop() {
        let b = Budget::new(100);
        let mut r = b.try_reserve(60).unwrap();
        assert_eq!(b.in_use(), 60);
        assert!(b.try_reserve(41).is_err());
        r.resize(20).unwrap();
        assert_eq!(b.in_use(), 20);
        r.resize(90).unwrap();
        assert!(r.resize(101).is_ok(), "capped at the budget's size");
        assert_eq!(r.bytes(), 100);
        let part = r.split(30);
        assert_eq!((part.bytes(), r.bytes()), (30, 70));
        drop(r);
        assert_eq!(b.in_use(), 30);
        drop(part);
        assert_eq!(b.in_use(), 0);
        let err = b.try_reserve(1000).map(|r| r.bytes());
        assert_eq!(err.unwrap(), 100);
    }

    #[tokio::test]
    async fn budgets_resize_at_run_time() {
        let b = Budget::new(100);
        let held = b.try_reserve(80).unwrap();
        b.set_total(200);
        assert!(b.try_reserve(120).is_ok());
        b.set_total(50); // 20 free now; 30 more to take back once released
        assert!(b.try_reserve(1).is_err());
        drop(held);
        // The debt is collected by a task as the 80 bytes come back.
        for _ in 0..100 {
            if b.sem.available_permits() == 50 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(b.sem.available_permits(), 50);
        assert_eq!(b.in_use(), 0);
    }
}
