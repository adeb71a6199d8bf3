import DequeModule
import Synchronization

/// A snapshot of one pipeline stage's counters: where elements are, and where the stage
/// spends its time waiting — the "channel blocked, no response" of a Go pipeline made
/// visible.
///
/// Reading the waits: a stage whose workers wait long for input is fed too slowly (the
/// bottleneck is upstream); a stage that waits long for output space is held back by a
/// slower stage downstream (or the consumer). The stage with little of either is the
/// bottleneck.
///
/// The counters add up over every iteration of the stage (a stage value can be iterated
/// more than once).
public struct StageStats: Sendable, Hashable, CustomStringConvertible {
    /// The stage's name.
    public var name: String
    /// Elements taken from upstream.
    public var received: Int
    /// Results passed downstream.
    public var emitted: Int
    /// Elements whose transform failed and that the `.skip` policy left out.
    public var skipped: Int
    /// Transform attempts repeated under the `.retry` policy.
    public var retried: Int
    /// Elements taken from upstream and not yet passed downstream or left out, now.
    public var inFlight: Int
    /// Time the stage's workers spent with nothing to transform, summed over the workers.
    ///
    /// A stage with `concurrency: 1` pulls its upstream itself; it counts that wait only when
    /// the upstream is another stage or `map(concurrency:)` (timing every pull from any
    /// source would cost two clock readings per element). Its first stage over a plain
    /// source therefore shows zero here; and a transform of such a stage that itself
    /// iterates a Corral stream adds that stream's waits to this counter.
    public var waitingForInput: Duration
    /// Time the stage spent unable to take more from upstream because its buffer was full of
    /// results downstream had not taken: downstream was not keeping up. (A stage whose buffer
    /// is full of elements waiting for its own workers is busy, not waiting: that time is in
    /// neither counter.)
    public var waitingForOutput: Duration

    /// One line: the name and every counter.
    public var description: String {
        "\(name): received \(received), emitted \(emitted), skipped \(skipped), retried \(retried), "
            + "in flight \(inFlight), waiting for input \(waitingForInput), waiting for output \(waitingForOutput)"
    }
}

/// A transform error that a pipeline stage's error policy handled (left the element out).
public struct StageError: Error, Sendable, CustomStringConvertible {
    /// The stage's name.
    public var stage: String
    /// The transform's last error.
    public var error: any Error
    /// How many times the transform was tried on the element.
    public var attempts: Int

    /// The stage, the attempts and the error.
    public var description: String {
        "stage \"\(stage)\" left an element out after \(attempts) attempt\(attempts == 1 ? "" : "s"): \(error)"
    }
}

/// The live counters behind ``StageStats``, shared by every iteration of one stage.
@usableFromInline
final class StageCounters: Sendable {
    @usableFromInline let name: String
    @usableFromInline let received = Atomic<Int>(0)
    @usableFromInline let emitted = Atomic<Int>(0)
    @usableFromInline let skipped = Atomic<Int>(0)
    @usableFromInline let retried = Atomic<Int>(0)
    @usableFromInline let inFlight = Atomic<Int>(0)
    @usableFromInline let inputWaitNanoseconds = Atomic<Int>(0)
    @usableFromInline let outputWaitNanoseconds = Atomic<Int>(0)
    private let errors: LockedState<Deque<StageError>>
    private let errorLimit: Int

    @usableFromInline
    init(name: String, errorLimit: Int = 64) {
        self.name = name
        self.errorLimit = errorLimit
        self.errors = LockedState(Deque())
    }

    @inlinable
    func recordReceived() {
        received.add(1, ordering: .relaxed)
        inFlight.add(1, ordering: .relaxed)
    }

    @inlinable
    func recordEmitted() {
        emitted.add(1, ordering: .relaxed)
        inFlight.subtract(1, ordering: .relaxed)
    }

    /// The consumer passed over an element the `.skip` policy left out.
    @inlinable
    func recordLeftOut() {
        inFlight.subtract(1, ordering: .relaxed)
    }

    /// Elements of an iteration that ended early, dropped while in flight.
    @inlinable
    func recordDropped(_ count: Int) {
        inFlight.subtract(count, ordering: .relaxed)
    }

    @inlinable
    func recordRetry() {
        retried.add(1, ordering: .relaxed)
    }

    @inlinable
    func recordWaitingForInput(_ duration: Duration) {
        inputWaitNanoseconds.add(duration.nanoseconds, ordering: .relaxed)
    }

    @inlinable
    func recordWaitingForOutput(_ duration: Duration) {
        outputWaitNanoseconds.add(duration.nanoseconds, ordering: .relaxed)
    }

    /// An element left out after its transform failed: counted, and kept among the recent
    /// errors (the oldest is forgotten beyond the limit).
    @usableFromInline
    func recordSkipped(_ error: StageError) {
        skipped.add(1, ordering: .relaxed)
        errors.withLock { errors in
            if errors.count == errorLimit { errors.removeFirst() }
            errors.append(error)
        }
    }

    var recentErrors: [StageError] {
        errors.withLock { Array($0) }
    }

    var snapshot: StageStats {
        StageStats(
            name: name,
            received: received.load(ordering: .relaxed),
            emitted: emitted.load(ordering: .relaxed),
            skipped: skipped.load(ordering: .relaxed),
            retried: retried.load(ordering: .relaxed),
            inFlight: inFlight.load(ordering: .relaxed),
            waitingForInput: .nanoseconds(inputWaitNanoseconds.load(ordering: .relaxed)),
            waitingForOutput: .nanoseconds(outputWaitNanoseconds.load(ordering: .relaxed)))
    }
}

extension Duration {
    /// The duration in whole nanoseconds (saturating). `package`: CorralServices uses it too.
    @inlinable
    package var nanoseconds: Int {
        let (seconds, attoseconds) = components
        let (product, overflow) = Int(seconds).multipliedReportingOverflow(by: 1_000_000_000)
        if overflow { return seconds < 0 ? .min : .max }
        return product &+ Int(attoseconds / 1_000_000_000)
    }
}
