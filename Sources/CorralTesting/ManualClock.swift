import Corral

/// A clock that moves only when a test tells it to, so that time-based code (a
/// ``Corral/RateLimiter``, a backoff, an idle timeout) is tested without sleeping.
///
/// ```swift
/// let clock = ManualClock()
/// let limiter = RateLimiter(rate: 1, per: .seconds(1), burst: 1, clock: clock)
/// try await limiter.wait()                     // the bucket starts full
/// async let second: Void = limiter.wait()      // must wait one second
/// await clock.waitForSleepers(count: 1)        // …and is now asleep on the clock
/// clock.advance(by: .seconds(1))               // wakes it
/// try await second
/// ```
///
/// Sleepers are woken in deadline order (ties in the order they went to sleep). A sleeper
/// whose task is cancelled throws `CancellationError` at once.
public final class ManualClock: Clock, Sendable {
    /// A point in the manual clock's time: an offset from its start.
    public struct Instant: InstantProtocol, Hashable, Sendable, CustomStringConvertible {
        /// Time since the clock's zero.
        public var offset: Duration

        /// The instant `offset` after the clock's zero.
        public init(offset: Duration) {
            self.offset = offset
        }

        /// The instant `duration` after this one.
        public func advanced(by duration: Duration) -> Instant {
            Instant(offset: offset + duration)
        }

        /// The time from this instant to `other`.
        public func duration(to other: Instant) -> Duration {
            other.offset - offset
        }

        /// Whether `lhs` is earlier than `rhs`.
        public static func < (lhs: Instant, rhs: Instant) -> Bool {
            lhs.offset < rhs.offset
        }

        /// `t+<offset>`.
        public var description: String { "t+\(offset)" }
    }

    private struct Sleeper {
        var id: UInt64
        var deadline: Instant
        var continuation: UnsafeContinuation<Void, any Error>?
        var cancelled = false
    }

    private struct State {
        var now: Instant
        var nextID: UInt64 = 0
        var sleepers: [Sleeper] = []
        var sleeperWatchers: [(count: Int, continuation: UnsafeContinuation<Void, Never>)] = []

        var suspendedSleepers: Int { sleepers.count { $0.continuation != nil } }

        mutating func watchersToWake() -> [UnsafeContinuation<Void, Never>] {
            let suspended = suspendedSleepers
            var woken: [UnsafeContinuation<Void, Never>] = []
            sleeperWatchers.removeAll { watcher in
                guard suspended >= watcher.count else { return false }
                woken.append(watcher.continuation)
                return true
            }
            return woken
        }
    }

    private let state: LockedState<State>

    /// Creates a clock that reads `start` until it is advanced.
    public init(start: Instant = Instant(offset: .zero)) {
        state = LockedState(State(now: start))
    }

    /// The current instant: where the last ``advance(by:)`` left the clock.
    public var now: Instant {
        state.withLock { $0.now }
    }

    /// Zero: the clock moves only in the steps a test makes.
    public var minimumResolution: Duration { .zero }

    /// The number of tasks sleeping on this clock right now.
    public var sleeperCount: Int {
        state.withLock { $0.suspendedSleepers }
    }

    /// Suspends until the clock reaches `deadline`.
    ///
    /// - Throws: `CancellationError` if the task is cancelled before (or while) it sleeps.
    public func sleep(until deadline: Instant, tolerance: Duration? = nil) async throws {
        try Task.checkCancellation()
        let id: UInt64? = state.withLock { state in
            guard state.now < deadline else { return nil }
            state.nextID += 1
            state.sleepers.append(Sleeper(id: state.nextID, deadline: deadline))
            return state.nextID
        }
        guard let id else { return }
        try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<Void, any Error>) in
                let (resumeNow, watchers): (Bool, [UnsafeContinuation<Void, Never>]) = state.withLock { state in
                    guard let index = state.sleepers.firstIndex(where: { $0.id == id }) else {
                        return (true, [])  // woken before it could suspend
                    }
                    if state.sleepers[index].cancelled {
                        state.sleepers.remove(at: index)
                        return (true, [])
                    }
                    state.sleepers[index].continuation = continuation
                    return (false, state.watchersToWake())
                }
                for watcher in watchers { watcher.resume() }
                if resumeNow {
                    if Task.isCancelled {
                        continuation.resume(throwing: CancellationError())
                    } else {
                        continuation.resume()
                    }
                }
            }
        } onCancel: {
            let continuation: UnsafeContinuation<Void, any Error>? = state.withLock { state in
                guard let index = state.sleepers.firstIndex(where: { $0.id == id }) else { return nil }
                guard let continuation = state.sleepers[index].continuation else {
                    state.sleepers[index].cancelled = true
                    return nil
                }
                state.sleepers.remove(at: index)
                return continuation
            }
            continuation?.resume(throwing: CancellationError())
        }
    }

    /// Moves the clock forward by `duration`, waking every sleeper whose deadline it reaches.
    public func advance(by duration: Duration) {
        precondition(duration >= .zero, "ManualClock.advance(by:): duration must not be negative, got \(duration)")
        advance(to: now.advanced(by: duration))
    }

    /// Moves the clock to `instant` (never backwards), waking every sleeper whose deadline it
    /// reaches, earliest deadline first.
    public func advance(to instant: Instant) {
        let due: [UnsafeContinuation<Void, any Error>] = state.withLock { state in
            guard state.now < instant else { return [] }
            state.now = instant
            var due: [(Instant, UInt64, UnsafeContinuation<Void, any Error>?)] = []
            state.sleepers.removeAll { sleeper in
                guard sleeper.deadline <= instant, !sleeper.cancelled else { return false }
                due.append((sleeper.deadline, sleeper.id, sleeper.continuation))
                return true
            }
            due.sort { ($0.0, $0.1) < ($1.0, $1.1) }
            return due.compactMap { $0.2 }
        }
        for continuation in due { continuation.resume() }
    }

    /// Returns once at least `count` tasks are asleep on this clock: the synchronisation a
    /// test needs before it calls ``advance(by:)``.
    public func waitForSleepers(count: Int) async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let ready: Bool = state.withLock { state in
                if state.suspendedSleepers >= count { return true }
                state.sleeperWatchers.append((count, continuation))
                return false
            }
            if ready { continuation.resume() }
        }
    }
}
