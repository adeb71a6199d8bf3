/// The state of a ``RateLimiter``: a token bucket kept as a theoretical arrival time
/// (GCRA), a *head* waiter that sleeps on the clock, and the line behind it.
///
/// The bucket: each token costs `interval / rate` of time. `tat` is the instant at which
/// the bucket would be full again given every token taken so far (`nil` or in the past:
/// full). Taking `n` tokens moves `tat` to `max(tat, now) + n × cost`, which is allowed when
/// it lands no further than `burst × cost` ahead of `now`. Exact `Duration` arithmetic, no
/// floating point, no refill ticker.
///
/// The waiters, strictly FIFO: at most one *head* sleeps on the clock until its tokens are
/// due; everyone else waits in `line` without a timer. When the head takes its tokens, is
/// cancelled, or times out, it hands the head role to the first in line.
///
/// | event                 | condition                                  | effect |
/// |-----------------------|--------------------------------------------|--------|
/// | `waitRequested(n)`    | `n > burst`                                | `.exceedsBurst` |
/// |                       | no head, line empty, tokens available      | take them, `.acquired` |
/// |                       | no head, line empty, tokens not available  | become head, `.sleep(until:)` |
/// |                       | otherwise                                  | join the line, `.suspend(id)` |
/// | `waiterSuspended`     | promoted or cancelled meanwhile            | resume at once |
/// | `waiterCancelled(id)` | in line                                    | leave it (`.cancelled`) |
/// |                       | already promoted                           | nothing: it finds out as head |
/// | `headWoke(n)`         | tokens available                           | take them, hand off, `.acquired` |
/// |                       | otherwise (clock drift)                    | `.sleep(until:)` again |
/// | `headGaveUp`          | —                                          | hand off |
///
/// *Hand off*: the first in line (if any) is promoted to head (`.promoted`); otherwise there
/// is no head.
@usableFromInline
struct RateLimiterStateMachine<Instant: InstantProtocol> where Instant.Duration == Duration {
    @usableFromInline
    enum Outcome: Sendable {
        case promoted
        case cancelled
    }

    @usableFromInline
    enum WaitAction {
        case acquired
        case sleep(until: Instant)
        case suspend(WaiterID)
        case exceedsBurst
    }

    @usableFromInline
    enum HeadAction {
        case acquired(Resumption<Outcome>?)
        case sleep(until: Instant)
    }

    @usableFromInline let tokenCost: Duration
    @usableFromInline let burst: Int
    @usableFromInline let tolerance: Duration
    /// The most tokens whose cost is computed exactly (at most ``horizon``, or any number at a
    /// zero token cost); more cost ``horizon``.
    @usableFromInline let maximumExactTokens: Int
    @usableFromInline var tat: Instant?
    @usableFromInline var hasHead = false
    @usableFromInline var line = WaiterQueue<Int, Outcome>()

    /// The farthest ahead the limiter computes: 2^40 s, some 35,000 years. The cost of a
    /// request, and the burst's tolerance, are clamped to it, so that a huge burst (`.max`,
    /// "no burst limit") or request cannot overflow `Duration` or the clock's instants.
    @inlinable
    static var horizon: Duration { .seconds(Int64(1) << 40) }

    @inlinable
    init(tokenCost: Duration, burst: Int) {
        self.tokenCost = tokenCost
        self.burst = burst
        if tokenCost == .zero {
            maximumExactTokens = .max
        } else {
            let ratio = Self.horizon / tokenCost
            maximumExactTokens = ratio >= Double(Int.max) ? .max : Int(ratio)
        }
        self.tolerance = burst > maximumExactTokens ? Self.horizon : tokenCost * burst
    }

    /// What `tokens` tokens cost, clamped to ``horizon``.
    @inlinable
    func cost(_ tokens: Int) -> Duration {
        tokens > maximumExactTokens ? Self.horizon : tokenCost * tokens
    }

    /// Waiters right now: the head plus the line.
    @inlinable
    var waiters: Int { line.count + (hasHead ? 1 : 0) }

    @inlinable
    mutating func waitRequested(_ tokens: Int, now: Instant) -> WaitAction {
        if hasHead || !line.isEmpty {
            return tokens > burst ? .exceedsBurst : .suspend(line.enqueue(tokens))
        }
        if tokens > burst { return .exceedsBurst }
        switch take(tokens, now: now) {
        case nil:
            return .acquired
        case let readyAt?:
            hasHead = true
            return .sleep(until: readyAt)
        }
    }

    @inlinable
    mutating func tryAcquire(_ tokens: Int, now: Instant) -> Bool {
        guard !hasHead && line.isEmpty && tokens <= burst else { return false }
        return take(tokens, now: now) == nil
    }

    @inlinable
    mutating func waiterSuspended(_ id: WaiterID, _ continuation: UnsafeContinuation<Outcome, Never>) -> Resumption<Outcome>? {
        line.suspend(id, continuation: continuation)
    }

    @inlinable
    mutating func waiterCancelled(_ id: WaiterID) -> Resumptions<Outcome> {
        line.cancel(id, with: .cancelled)
    }

    /// The head woke up (or was just promoted): take its tokens if they are due.
    @inlinable
    mutating func headWoke(_ tokens: Int, now: Instant) -> HeadAction {
        precondition(hasHead, "RateLimiter: headWoke without a head")
        if let readyAt = take(tokens, now: now) {
            return .sleep(until: readyAt)
        }
        return .acquired(handOff())
    }

    /// The head stops waiting (cancelled or timed out) without taking tokens.
    @inlinable
    mutating func headGaveUp() -> Resumption<Outcome>? {
        precondition(hasHead, "RateLimiter: headGaveUp without a head")
        return handOff()
    }

    @inlinable
    mutating func handOff() -> Resumption<Outcome>? {
        guard let next = line.settleFirst(with: .promoted) else {
            hasHead = false
            return nil
        }
        return next.resumption  // nil if it had not suspended yet: it sees `.promoted` then
    }

    /// Takes `tokens` if the bucket holds them at `now` (returns `nil`), or returns the
    /// instant at which it will (taking nothing).
    @inlinable
    mutating func take(_ tokens: Int, now: Instant) -> Instant? {
        let base: Instant
        if let tat, now < tat { base = tat } else { base = now }
        let newTat = base.advanced(by: cost(tokens))
        if now.duration(to: newTat) <= tolerance {
            tat = newTat
            return nil
        }
        return newTat.advanced(by: .zero - tolerance)
    }
}
