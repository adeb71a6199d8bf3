/// The producer tasks behind a stream operator, and the stream's first error.
///
/// An `AsyncSequence` operator cannot own a task group: its consumer pulls, one `next()` at a
/// time, and may stop at any moment. So an operator starts its producer tasks on the first
/// `next()` in a ``TaskTracker`` (the one place DESIGN.md allows unstructured tasks: they are
/// counted, and leak-checked by CorralTesting's `expectNoLeakedTasks`), and cancels them when
/// the consumer is cancelled, stops early (drops its iterator), or the stream fails.
@usableFromInline
final class StreamTasks: Sendable {
    @usableFromInline let tracker: TaskTracker
    private let failure = LockedState<(any Error)?>(nil)

    @usableFromInline
    init(name: String, limit: Int) {
        tracker = TaskTracker(name: name, limit: max(1, limit))
    }

    /// Starts a producer task.
    @usableFromInline
    func start(_ operation: sending @escaping @isolated(any) () async -> Void) {
        // A producer is nobody's lone stage worker unless it says so: without this it would
        // inherit the consumer's stage counters (when the consumer is a stage's lone worker)
        // and count its own waits as that stage's. (The tracker also drops the consumer's
        // deadline, which never cancels these tasks.)
        let started: Bool
        if StreamDownstream.stageCounters.get() != nil {
            started = tracker.trySpawn {
                await StreamDownstream.stageCounters.withValue(nil) { await operation() }
            }
        } else {
            started = tracker.trySpawn(operation)  // nothing to drop: no extra frame
        }
        guard started else {
            // A producer that already started may have failed the stream (closing the
            // tracker) while the others were being started: those are not needed any more.
            // Anything else is more producers than the limit, a bug of the operator.
            precondition(tracker.isClosed, "StreamTasks: more producers than the limit it was created with")
            return
        }
    }

    /// Records the stream's first error and cancels every producer. Returns whether `error`
    /// was the first.
    @discardableResult
    func fail(_ error: any Error) -> Bool {
        let first = failure.withLock { failure in
            guard failure == nil else { return false }
            failure = error
            return true
        }
        if first { tracker.cancelAll() }
        return first
    }

    /// The stream's first error, if it failed.
    var error: (any Error)? {
        failure.withLock { $0 }
    }

    /// The consumer is gone or the stream is over: cancels every producer, and starts no more.
    @usableFromInline
    func cancel() {
        tracker.cancelAll()
        tracker.close()
    }
}
