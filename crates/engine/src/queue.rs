//! The admission queue between callers and the device worker: bounded, two priority levels,
//! and a worker-side wait that can hold a partial batch for `max_queue_delay`.
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::annotate::AnnotateTask;
use crate::{EngineError, Event, Priority, Ticket};

/// A job ready to run (its adapters resolved), waiting for the worker.
pub(crate) struct Queued {
    pub ticket: Ticket,
    pub request: diffusion::pipeline::Request,
    pub model: usize,
    pub enqueued: Instant,
}

#[derive(Default)]
struct State {
    high: VecDeque<Queued>,
    normal: VecDeque<Queued>,
    /// Admitted jobs whose adapters are still loading: they hold a queue slot.
    loading: usize,
    /// Network annotations waiting for the worker (one runs between two denoising steps).
    annotations: VecDeque<AnnotateTask>,
    closed: bool,
}

impl State {
    fn len(&self) -> usize {
        self.high.len() + self.normal.len()
    }

    fn images(&self) -> usize {
        self.high
            .iter()
            .chain(&self.normal)
            .map(|j| j.request.num_images)
            .sum()
    }
}

pub(crate) struct Queue {
    state: Mutex<State>,
    ready: Condvar,
    capacity: usize,
}

/// What the worker gets when it asks for work.
pub(crate) enum Take {
    /// Jobs to admit, and at most one annotation to run before the next step.
    Work(Vec<Queued>, Option<AnnotateTask>),
    /// Closed and empty: the worker may stop once its running jobs are done.
    Closed,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            ready: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot (for a job about to be queued or to load its adapters), or refuses at
    /// once. Returns the job's position: jobs ahead of it at its priority or above.
    pub fn reserve(&self, priority: Priority) -> Result<usize, EngineError> {
        let mut state = self.lock();
        if state.closed {
            return Err(EngineError::Stopped);
        }
        if state.len() + state.loading >= self.capacity {
            return Err(EngineError::Overloaded(self.capacity));
        }
        state.loading += 1;
        Ok(match priority {
            Priority::High => state.high.len(),
            Priority::Normal => state.len() + state.loading - 1,
        })
    }

    /// Gives back a slot reserved with [`Self::reserve`] that will not be used.
    pub fn release(&self) {
        let mut state = self.lock();
        state.loading = state.loading.saturating_sub(1);
    }

    /// Puts a job into its reserved slot.
    pub fn push(&self, job: Queued) {
        let mut state = self.lock();
        state.loading = state.loading.saturating_sub(1);
        match job.ticket.priority {
            Priority::High => state.high.push_back(job),
            Priority::Normal => state.normal.push_back(job),
        }
        drop(state);
        self.ready.notify_all();
    }

    /// Queues a network annotation, or refuses at once when `capacity` are waiting.
    pub fn push_annotation(&self, task: AnnotateTask) -> Result<(), EngineError> {
        let mut state = self.lock();
        if state.closed {
            return Err(EngineError::Stopped);
        }
        if state.annotations.len() >= self.capacity {
            return Err(EngineError::Overloaded(self.capacity));
        }
        state.annotations.push_back(task);
        drop(state);
        self.ready.notify_all();
        Ok(())
    }

    /// Annotations waiting.
    pub fn annotations(&self) -> usize {
        self.lock().annotations.len()
    }

    /// No new jobs from now on; the worker drains what is queued.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Jobs waiting (including those loading adapters).
    pub fn depth(&self) -> usize {
        let state = self.lock();
        state.len() + state.loading
    }

    /// Drops waiting jobs whose caller has gone and fails those past their deadline.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut guard = self.lock();
        let state = &mut *guard;
        for q in [&mut state.high, &mut state.normal] {
            q.retain(|j| {
                if j.ticket.gone() {
                    return false;
                }
                if j.ticket.expired(now) {
                    j.ticket.send(Event::Failed(EngineError::Timeout));
                    return false;
                }
                true
            });
        }
    }

    /// Jobs of up to `room` images in all, high priority first, in order (a job too big for
    /// the room waits at the head). With `wait` (nothing is running), blocks until there is a
    /// job, then holds up to `max_delay` after the oldest one arrived for the batch to fill to
    /// `room`, and takes at least one job whatever its size. Without `wait`, takes what is
    /// there now.
    pub fn take(&self, room: usize, wait: bool, max_delay: Duration) -> Take {
        let mut state = self.lock();
        if wait {
            // Deadlines of waiting jobs are checked as they come out; waiting here is bounded
            // by the next arrival or by close.
            while state.len() == 0 && state.annotations.is_empty() {
                if state.closed && state.loading == 0 {
                    return Take::Closed;
                }
                state = self
                    .ready
                    .wait_timeout(state, Duration::from_millis(200))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if !max_delay.is_zero() && state.len() > 0 {
                let oldest = [state.high.front(), state.normal.front()]
                    .into_iter()
                    .flatten()
                    .map(|j| j.enqueued)
                    .min()
                    .expect("not empty");
                let until = oldest + max_delay;
                while state.images() < room && !state.closed && state.annotations.is_empty() {
                    let now = Instant::now();
                    if now >= until {
                        break;
                    }
                    state = self
                        .ready
                        .wait_timeout(state, until - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        let mut jobs = Vec::new();
        let mut images = 0;
        loop {
            let next = if state.high.is_empty() {
                &mut state.normal
            } else {
                &mut state.high
            };
            let Some(n) = next.front().map(|j| j.request.num_images) else {
                break;
            };
            if images + n > room && !(wait && jobs.is_empty()) {
                break;
            }
            images += n;
            jobs.push(next.pop_front().expect("front exists"));
        }
        let annotation = state.annotations.pop_front();
        Take::Work(jobs, annotation)
    }
}
