/// A token-bucket rate limiter: at most `rate` tokens per `interval` on average, with
/// bursts of up to `burst` — Go's `golang.org/x/time/rate.Limiter`, FIFO and cancellable.
///
/// ```swift
/// let limiter = RateLimiter(rate: 100, per: .seconds(1), burst: 10)
/// for request in requests {
///     try await limiter.wait()              // suspends until a token is due
///     try await send(request)
/// }
/// ```
///
/// The bucket starts full (`burst` tokens) and refills continuously at `rate / interval`;
/// nothing runs in the background. Waiters are served strictly in arrival order: a request
/// for many tokens at the head of the line delays the smaller requests behind it. Only the
/// head of the line sleeps on the clock.
///
/// Generic over its `Clock`, so tests can drive it with a manual clock (CorralTesting's
/// `ManualClock`) instead of sleeping.
///
/// ## Cancellation
/// A waiter cancelled while it waits throws `CancellationError` (``TimeoutError`` when an
/// enclosing deadline passed) and takes no tokens; the line moves on without it. A waiter
/// whose turn comes at the instant it is cancelled, with its tokens already due, returns
/// normally having taken them. Cancellation is observed only when a call has to wait.
public final class RateLimiter<C: Clock>: Sendable where C.Duration == Duration {
    /// Tokens added per ``interval``.
    public let rate: Int
    /// The period over which ``rate`` tokens are added.
    public let interval: Duration
    /// The most tokens that can be taken at once (the bucket's size).
    public let burst: Int
    /// The clock that paces the limiter.
    public let clock: C
    @usableFromInline let state: LockedState<RateLimiterStateMachine<C.Instant>>

    /// Creates a limiter that allows `rate` tokens per `interval`, in bursts of up to `burst`.
    ///
    /// - Parameters:
    ///   - rate: Tokens added per `interval`; must be greater than 0.
    ///   - interval: The period; must be greater than zero.
    ///   - burst: The bucket's size (and the most one ``wait(_:)`` may ask for); must be
    ///     greater than 0.
    ///   - clock: The clock that paces the limiter.
    public init(rate: Int, per interval: Duration, burst: Int, clock: C) {
        precondition(rate > 0, "RateLimiter(rate:per:burst:): rate must be greater than 0, got \(rate)")
        precondition(interval > .zero, "RateLimiter(rate:per:burst:): interval must be greater than zero, got \(interval)")
        precondition(burst > 0, "RateLimiter(rate:per:burst:): burst must be greater than 0, got \(burst)")
        self.rate = rate
        self.interval = interval
        self.burst = burst
        self.clock = clock
        self.state = LockedState(RateLimiterStateMachine(tokenCost: interval / rate, burst: burst))
    }

    /// Waits until `tokens` tokens are available, then takes them.
    ///
    /// Returns at once, without suspending, when nobody is waiting and the tokens are there.
    ///
    /// - Parameter tokens: How many tokens to take; must be greater than 0.
    /// - Throws: ``CapacityError`` at once when `tokens > burst` (it could never be granted);
    ///   `CancellationError` when the task is cancelled while it waits, or ``TimeoutError``
    ///   when an enclosing deadline passes — in both cases no token was taken (unless its
    ///   turn came, with the tokens due, at that very instant: then it returns normally).
    @inlinable
    nonisolated(nonsending)
    public func wait(_ tokens: Int = 1) async throws {
        precondition(tokens > 0, "RateLimiter.wait(_:): tokens must be greater than 0, got \(tokens)")
        var readyAt: C.Instant
        switch state.withLock({ $0.waitRequested(tokens, now: clock.now) }) {
        case .acquired:
            return
        case .exceedsBurst:
            throw CapacityError(requested: tokens, capacity: burst, operation: "RateLimiter.wait")
        case .sleep(let instant):
            readyAt = instant
        case .suspend(let id):
            let outcome = await state.suspend { state, continuation in
                state.waiterSuspended(id, continuation)
            } onCancel: { state in
                state.waiterCancelled(id)
            }
            guard case .promoted = outcome else { throw DeadlineContext.cancellationError() }
            guard let instant = headWoke(tokens) else { return }
            readyAt = instant
        }
        // This task is the head of the line: sleep until its tokens are due.
        while true {
            do {
                try await clock.sleep(until: readyAt, tolerance: nil)
            } catch {
                state.withLock { $0.headGaveUp() }?.resume()
                throw error is CancellationError ? DeadlineContext.cancellationError() : error
            }
            guard let instant = headWoke(tokens) else { return }
            readyAt = instant
        }
    }

    /// As the head: takes the tokens if due (returns `nil`), or returns when to try again.
    @inlinable
    func headWoke(_ tokens: Int) -> C.Instant? {
        switch state.withLock({ $0.headWoke(tokens, now: clock.now) }) {
        case .acquired(let next):
            next?.resume()
            return nil
        case .sleep(let instant):
            return instant
        }
    }

    /// Takes `tokens` tokens only if they are available now and nobody is waiting.
    ///
    /// - Returns: `true` if the tokens were taken; `false` otherwise, including when
    ///   `tokens > burst` (which could never be granted).
    @inlinable
    public func tryAcquire(_ tokens: Int = 1) -> Bool {
        precondition(tokens > 0, "RateLimiter.tryAcquire(_:): tokens must be greater than 0, got \(tokens)")
        return state.withLock { $0.tryAcquire(tokens, now: clock.now) }
    }

    /// The number of tasks waiting right now (a snapshot, for diagnostics).
    public var waiters: Int {
        state.withLock { $0.waiters }
    }
}

extension RateLimiter where C == ContinuousClock {
    /// Creates a limiter on the continuous clock that allows `rate` tokens per `interval`,
    /// in bursts of up to `burst`.
    ///
    /// - Parameters:
    ///   - rate: Tokens added per `interval`; must be greater than 0.
    ///   - interval: The period; must be greater than zero.
    ///   - burst: The bucket's size (and the most one ``wait(_:)`` may ask for); must be
    ///     greater than 0.
    public convenience init(rate: Int, per interval: Duration, burst: Int) {
        self.init(rate: rate, per: interval, burst: burst, clock: ContinuousClock())
    }
}
