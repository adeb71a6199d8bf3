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
    ///
    /// An element the `.skip` policy left out counts in ``skipped`` at once, and here too
    /// until the consumer has gone past its place in the buffer. So while the consumer is
    /// behind, `emitted + skipped + inFlight` may exceed `received` by up to the buffer;
    /// once the stage is still, `received == emitted + skipped` (less what an early stop
    /// dropped).
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
    /// The counters themselves; the iterations' hot paths use them without touching this
    /// object's reference count.
    @usableFromInline let cells: StageCells
    private let errors: LockedState<Deque<StageError>>
    private let errorLimit: Int

    @usableFromInline
    init(name: String, errorLimit: Int = 64) {
        self.name = name
        self.errorLimit = errorLimit
        self.errors = LockedState(Deque())
        self.cells = StageCells()
    }

    deinit {
        cells.deallocate()
    }

    /// An element left out after its transform failed: counted, and kept among the recent
    /// errors (the oldest is forgotten beyond the limit).
    @usableFromInline
    func recordSkipped(_ error: StageError) {
        cells.add(1, to: StageCells.skipped)
        errors.withLock { errors in
            if errors.count == errorLimit { errors.removeFirst() }
            errors.append(error)
        }
    }

    @usableFromInline
    func recordRetry() {
        cells.add(1, to: StageCells.retried)
    }

    @usableFromInline
    func recordWaitingForInput(_ duration: Duration) {
        cells.recordWaitingForInput(duration)
    }

    var recentErrors: [StageError] {
        errors.withLock { Array($0) }
    }

    var snapshot: StageStats {
        // In flight = received - emitted - left out - dropped. Each element is received
        // before it is emitted, left out or dropped, and those counters are added with
        // release and read here with acquire before `received`: the difference is never
        // below what was in flight at some moment of the read.
        let emitted = cells.load(StageCells.emitted)
        let leftOut = cells.load(StageCells.leftOut)
        let dropped = cells.load(StageCells.dropped)
        let received = cells.load(StageCells.received)
        return StageStats(
            name: name,
            received: received,
            emitted: emitted,
            skipped: cells.load(StageCells.skipped),
            retried: cells.load(StageCells.retried),
            inFlight: Swift.max(0, received - emitted - leftOut - dropped),
            waitingForInput: .nanoseconds(cells.load(StageCells.inputWait)),
            waitingForOutput: .nanoseconds(cells.load(StageCells.outputWait)))
    }
}

/// A stage's counters, each on cache lines of its own (``PaddedAtomics``), so that the
/// producer and the consumer record every element without retaining anything (a shared
/// reference count, or counters written by both sides on one cache line, would bounce that
/// line between the cores on every element). Its owner, ``StageCounters``, frees it.
@usableFromInline
struct StageCells: Sendable {
    @usableFromInline let counters: PaddedAtomics

    // Written by the stage's producer side (the feeder, or the lone worker).
    @usableFromInline static var received: Int { 0 }
    // Written by the stage's consumer.
    @usableFromInline static var emitted: Int { 1 }
    @usableFromInline static var leftOut: Int { 2 }
    // Written at the end of an iteration, on errors and on waits.
    @usableFromInline static var dropped: Int { 3 }
    @usableFromInline static var skipped: Int { 4 }
    @usableFromInline static var retried: Int { 5 }
    @usableFromInline static var inputWait: Int { 6 }
    @usableFromInline static var outputWait: Int { 7 }
    @usableFromInline static var count: Int { 8 }

    @usableFromInline
    init() {
        counters = PaddedAtomics(count: Self.count)
    }

    func deallocate() {
        counters.deallocate()
    }

    @inlinable
    func add(_ value: Int, to counter: Int) {
        counters[counter].pointee.wrappingAdd(value, ordering: .releasing)
    }

    @inlinable
    func load(_ counter: Int) -> Int {
        counters[counter].pointee.load(ordering: .acquiring)
    }

    /// An element taken from upstream: in flight from now.
    @inlinable
    func recordReceived() { add(1, to: Self.received) }

    /// A result passed downstream.
    @inlinable
    func recordEmitted() { add(1, to: Self.emitted) }

    /// The consumer passed over an element the `.skip` policy left out.
    @inlinable
    func recordLeftOut() { add(1, to: Self.leftOut) }

    /// Elements of an iteration that ended early, dropped while in flight.
    @inlinable
    func recordDropped(_ count: Int) { add(count, to: Self.dropped) }

    @inlinable
    func recordWaitingForInput(_ duration: Duration) {
        add(duration.nanoseconds, to: Self.inputWait)
    }

    @inlinable
    func recordWaitingForOutput(_ duration: Duration) {
        add(duration.nanoseconds, to: Self.outputWait)
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
