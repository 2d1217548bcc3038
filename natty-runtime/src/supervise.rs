//! Supervision: every running part of a service (a consumer, a capture, a subscription or
//! service, a KV watch, an election) is a [`Task`] the [`Supervisor`] starts, watches and
//! drains the same way. A kind of handler gives the runtime a `Task`; it needs nothing else.

use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::telemetry::Health;

/// How a task is told to stop: `cancel` starts the drain (stop taking work, finish what is
/// held), `hard_stop` ends it (the drain timeout passed: give back what is still in flight).
#[derive(Clone, Default)]
pub(crate) struct Stop {
    pub(crate) cancel: CancellationToken,
    pub(crate) hard_stop: CancellationToken,
}

/// One running part of a service, not started yet.
pub(crate) struct Task {
    /// How readiness and logs name it, e.g. "consumer billing".
    label: String,
    run: Box<dyn FnOnce(Stop) -> BoxFuture<'static, Result<()>> + Send>,
}

impl Task {
    /// A task named `label` that `run` starts. It runs until told to stop; ending on its own
    /// with an error stops the service (an error it cannot retry), and so does a panic.
    pub(crate) fn new<F, Fut>(label: String, run: F) -> Task
    where
        F: FnOnce(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Task {
            label,
            run: Box::new(move |stop| Box::pin(run(stop))),
        }
    }
}

/// Runs the tasks of a service: each visible in readiness while it runs, the first to end on
/// its own stopping the service, all drained on shutdown within deadlines.
pub(crate) struct Supervisor<'a> {
    tasks: tokio::task::JoinSet<Result<()>>,
    health: &'a Health,
    stop: Stop,
}

impl<'a> Supervisor<'a> {
    pub(crate) fn new(health: &'a Health) -> Self {
        Supervisor {
            tasks: tokio::task::JoinSet::new(),
            health,
            stop: Stop::default(),
        }
    }

    /// Starts `task`.
    pub(crate) fn spawn(&mut self, task: Task) {
        let running = self.health.task(task.label);
        let run = (task.run)(self.stop.clone());
        self.tasks.spawn(async move {
            let _running = running;
            run.await
        });
    }

    /// Waits for `shutdown`, or for a task to end first, which stops the service: the error
    /// it ended with, if any, is returned, to be the service's.
    pub(crate) async fn watch(&mut self, shutdown: impl Future<Output = ()>) -> Option<Error> {
        tokio::select! {
            _ = shutdown => None,
            Some(result) = self.tasks.join_next() => match result {
                // A capture stops on an error it cannot retry (a path template its keys cannot fill).
                Ok(Err(error)) => {
                    tracing::error!(error = %crate::error::chain(&error), "a task failed; shutting down");
                    Some(error)
                }
                // Any other task only ends on its own when it panicked: that is a bug, stop loudly.
                other => {
                    tracing::error!(result = ?other, "a task stopped unexpectedly; shutting down");
                    None
                }
            }
        }
    }

    /// Drains: every task is told to stop and given `drain_timeout` to finish; then told to
    /// give back what it holds, and given `grace`; what is still running after that is
    /// abandoned (what it held is redelivered).
    pub(crate) async fn drain(mut self, drain_timeout: Duration, grace: Duration) {
        self.health.set_draining();
        self.stop.cancel.cancel();
        // Every wait from here on has a deadline: with the server gone, a flush or a send waits
        // for a reconnect that may never come. What is left unsettled is redelivered later.
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(drain_timeout, drain).await.is_ok() {
            return;
        }
        tracing::warn!("drain timeout reached: naking what is still in flight");
        self.stop.hard_stop.cancel();
        let stopped = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, stopped).await.is_err() {
            tracing::error!(
                tasks = self.tasks.len(),
                "tasks still running after the drain timeout (a handler that ignores cancellation, or a server that is gone); abandoning them: what they held is redelivered"
            );
            self.tasks.abort_all();
        }
    }
}
