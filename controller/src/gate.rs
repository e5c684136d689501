//! "Persist, then act", as a component with no I/O.
//!
//! The core emits a persist before the messages that follow from it. A shell
//! queues the persist with its store writer, which answers with a ticket, and
//! hands every action (a send, a close, an API reply) to the gate: the action
//! runs at once when nothing it follows is still on its way to disk, and
//! otherwise waits, in order, until the writer reports its ticket durable.
//! The daemon's actor and the simulator use this same gate, so the simulator
//! checks the ordering the daemon really has.

use std::collections::VecDeque;

/// Orders actions after the persists they follow. `T` is the store writer's
/// ticket (ordered, increasing per persist); `A` an action.
#[derive(Debug)]
pub struct Gate<T, A> {
    /// The latest persist queued.
    last: Option<T>,
    /// Actions waiting, each with the persist it follows, in the order they were given.
    waiting: VecDeque<(T, A)>,
}

impl<T: Copy + Ord, A> Default for Gate<T, A> {
    fn default() -> Gate<T, A> {
        Gate { last: None, waiting: VecDeque::new() }
    }
}

impl<T: Copy + Ord, A> Gate<T, A> {
    /// A gate with nothing queued.
    pub fn new() -> Gate<T, A> {
        Gate::default()
    }

    /// A persist was queued and will be durable once `ticket` is.
    pub fn persisted(&mut self, ticket: T) {
        debug_assert!(self.last.is_none_or(|l| l < ticket), "tickets increase");
        self.last = Some(ticket);
    }

    /// Hands in an action; returns it when it may run now (every persist
    /// before it is durable and nothing waits ahead of it), else keeps it.
    pub fn admit(&mut self, action: A, durable: Option<T>) -> Option<A> {
        match self.last {
            Some(t) if durable.is_none_or(|d| t > d) || !self.waiting.is_empty() => {
                self.waiting.push_back((t, action));
                None
            }
            _ => Some(action),
        }
    }

    /// The writer made everything up to `ticket` durable: the actions that may now run, in order.
    pub fn durable(&mut self, ticket: T) -> Vec<A> {
        let mut ready = Vec::new();
        while self.waiting.front().is_some_and(|(t, _)| *t <= ticket) {
            ready.push(self.waiting.pop_front().expect("front exists").1);
        }
        ready
    }

    /// Actions waiting for a persist.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Drops every waiting action: their persists will never be durable (the store failed).
    pub fn clear(&mut self) {
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::Gate;

    #[test]
    fn with_nothing_persisted_an_action_runs_at_once() {
        let mut g: Gate<u64, &str> = Gate::new();
        assert_eq!(g.admit("send", None), Some("send"));
    }

    #[test]
    fn an_action_waits_for_the_persist_before_it_and_runs_in_order() {
        let mut g: Gate<u64, &str> = Gate::new();
        g.persisted(1);
        assert_eq!(g.admit("a", None), None);
        g.persisted(2);
        assert_eq!(g.admit("b", Some(1)), None, "b follows persist 2, not durable yet");
        assert_eq!(g.durable(1), vec!["a"]);
        assert_eq!(g.waiting(), 1);
        assert_eq!(g.durable(2), vec!["b"]);
        assert_eq!(g.admit("c", Some(2)), Some("c"), "everything before c is durable");
    }

    #[test]
    fn an_action_never_overtakes_one_that_waits() {
        let mut g: Gate<u64, &str> = Gate::new();
        g.persisted(1);
        assert_eq!(g.admit("first", None), None);
        // Its own persist is durable, but "first" still waits: order on a connection holds.
        assert_eq!(g.admit("second", Some(1)), None);
        assert_eq!(g.durable(1), vec!["first", "second"]);
    }

    #[test]
    fn a_failed_store_drops_what_waits() {
        let mut g: Gate<u64, &str> = Gate::new();
        g.persisted(1);
        g.admit("reply", None);
        g.clear();
        assert!(g.durable(1).is_empty());
    }
}
