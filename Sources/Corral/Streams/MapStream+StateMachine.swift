import DequeModule

/// The state of one iteration of `map(concurrency:ordered:buffer:_:)`: one feeder task pulls
/// the source into `input`, `concurrency` worker tasks transform from `input` into `output`,
/// and the consumer (the iterator's `next()`) takes `output` in one swap. With
/// `concurrency == 1` a lone worker pulls, transforms and appends to `output` itself (no
/// feeder, no `input`): half the tasks and hand-offs of a pipeline stage.
///
/// Flow control is a window of credits: the feeder pulls an element only while fewer than
/// `window` elements are taken from the source and not yet returned by `next()` (the
/// consumer reports what it returned each time it takes the lock). So `input`, the workers'
/// hands, `output` and the consumer's reorder ring hold at most `window` elements together,
/// and in ordered mode an element's index is always within `window` of the next one to
/// return: the consumer's reorder ring has `window` slots.
///
/// Invariants: `fed - delivered <= window`; `busy` = elements taken by workers whose result
/// is not yet in `output`; a parked worker exists only while `input` is empty; the consumer
/// is parked only while `output` is empty and the iteration is neither drained nor over.
///
/// Transitions (the iteration is *over* once it failed or the consumer ended it):
///
/// | event                        | condition                         | effect |
/// |------------------------------|-----------------------------------|--------|
/// | `feederMayPull`              | over                              | `.stop` |
/// |                              | `fed - delivered < window`        | `.pull` |
/// |                              | otherwise                         | `.wait` (then `feederParked`) |
/// | `elementArrived(e)`          | over                              | dropped; the feeder stops |
/// |                              | —                                 | append to `input`; wake an idle worker unless enough are already waking |
/// | `soloProduced(v)`            | over                              | dropped; the lone worker stops |
/// |                              | —                                 | append to `output` (the element is `fed` only now: a lone worker holds one element outside the window's count, and pulls only while `fed - delivered < window`, so the bound holds); wake the consumer |
/// | `sourceEnded`                | —                                 | wake every idle worker (it takes what is left or exits); wake the consumer if drained |
/// | `workerTake`                 | over                              | `.exit` |
/// |                              | `input` non-empty                 | take a chunk, `busy += n`, `.work` |
/// |                              | source ended                      | `.exit` |
/// |                              | otherwise                         | `.wait` (then `workerParked`) |
/// | `resultProduced(i, v)`       | over                              | dropped |
/// |                              | —                                 | `busy -= 1`, append to `output`, wake the consumer |
/// | `consumerTake(delivered)`    | —                                 | return credits (wake the feeder if it may pull again); then: failed → `.failed`; ended → `.finished`; `output` non-empty → swap it out; drained → `.finished`; otherwise `.wait` |
/// | `consumerCancelled`          | consumer parked                   | resume it (it throws unless `output` filled meanwhile) |
/// | `failed(error)`              | not over                          | keep the first error; stop the feeder and idle workers; wake the consumer |
/// | `consumerEnded`              | —                                 | over: stop the feeder and idle workers (the caller cancels the tasks) |
@usableFromInline
struct MapStreamState<Element, Transformed> {
    @usableFromInline let window: Int
    @usableFromInline let concurrency: Int

    @usableFromInline var input: Deque<(index: Int, element: Element)>
    @usableFromInline var output: [(index: Int, value: Transformed)] = []
    /// Elements taken from the source.
    @usableFromInline var fed = 0
    /// Elements returned by `next()`, as last reported by the consumer.
    @usableFromInline var delivered = 0
    /// Elements taken by workers whose result is not yet in `output`.
    @usableFromInline var busy = 0
    @usableFromInline var sourceHasEnded = false
    /// The first error of the source or a transform.
    @usableFromInline var failure: (any Error)?
    /// The consumer ended the iteration (it finished, was cancelled or dropped its iterator).
    @usableFromInline var consumerHasEnded = false

    @usableFromInline var feeder: UnsafeContinuation<Bool, Never>?
    @usableFromInline var idleWorkers: [UnsafeContinuation<Bool, Never>] = []
    /// Idle workers resumed to take work that have not yet taken the lock again.
    @usableFromInline var wakingWorkers = 0
    @usableFromInline var consumer: UnsafeContinuation<Void, Never>?
    @usableFromInline var consumerWasCancelled = false

    @inlinable
    init(window: Int, concurrency: Int) {
        self.window = window
        self.concurrency = concurrency
        self.input = Deque(minimumCapacity: window)
        self.output.reserveCapacity(window)
    }

    @inlinable var isOver: Bool { failure != nil || consumerHasEnded }

    /// Every element has been transformed and taken by the consumer.
    @inlinable var isDrained: Bool {
        sourceHasEnded && input.isEmpty && busy == 0 && output.isEmpty
    }

    // MARK: Feeder

    @usableFromInline
    enum FeederAction {
        case pull, wait, stop
    }

    @inlinable
    func feederMayPull() -> FeederAction {
        if isOver { return .stop }
        return fed - delivered < window ? .pull : .wait
    }

    /// Parks the feeder; returns the continuation to resume at once (with whether to pull)
    /// if it need not wait.
    @inlinable
    mutating func feederParked(_ continuation: UnsafeContinuation<Bool, Never>) -> (UnsafeContinuation<Bool, Never>, Bool)? {
        switch feederMayPull() {
        case .pull: return (continuation, true)
        case .stop: return (continuation, false)
        case .wait:
            feeder = continuation
            return nil
        }
    }

    /// Appends a pulled element. Returns the worker to wake, if any, and what the feeder
    /// does next.
    @inlinable
    mutating func elementArrived(_ element: Element) -> (worker: UnsafeContinuation<Bool, Never>?, next: FeederAction) {
        guard !isOver else { return (nil, .stop) }
        input.append((fed, element))
        fed += 1
        var worker: UnsafeContinuation<Bool, Never>?
        if wakingWorkers < input.count, let idle = idleWorkers.popLast() {
            wakingWorkers += 1
            worker = idle
        }
        return (worker, feederMayPull())
    }

    /// A lone worker (`concurrency == 1`: it pulls and transforms itself, no input queue)
    /// produced the result of the next element. Returns the consumer to wake and what the
    /// worker does next.
    @inlinable
    mutating func soloProduced(
        _ value: Transformed
    ) -> (consumer: UnsafeContinuation<Void, Never>?, next: FeederAction, accepted: Bool) {
        guard !isOver else { return (nil, .stop, false) }
        output.append((fed, value))
        fed += 1
        return (takeConsumer(), feederMayPull(), true)
    }

    /// The source ended. Returns the idle workers to wake (each takes what is left or exits;
    /// no worker parks once the source has ended) and the consumer to wake.
    @inlinable
    mutating func sourceEnded() -> (workers: [UnsafeContinuation<Bool, Never>], consumer: UnsafeContinuation<Void, Never>?) {
        sourceHasEnded = true
        var workers: [UnsafeContinuation<Bool, Never>] = []
        swap(&workers, &idleWorkers)
        wakingWorkers += workers.count
        return (workers, isDrained ? takeConsumer() : nil)
    }

    // MARK: Workers

    @usableFromInline
    enum WorkerAction {
        case work, wait, exit
    }

    /// How many elements a worker takes at once: one while the input is short, so that
    /// every worker gets some; a chunk when there is a backlog, so that a lock round trip
    /// is shared by several elements.
    @inlinable
    func chunkSize() -> Int {
        let share = input.count / (2 * concurrency)
        return Swift.max(1, Swift.min(share, 16))
    }

    /// A worker looks for work; `wasWoken` when it was resumed to take some.
    @inlinable
    mutating func workerTake(into batch: inout [(index: Int, element: Element)], wasWoken: Bool) -> WorkerAction {
        if wasWoken { wakingWorkers -= 1 }
        if isOver { return .exit }
        if !input.isEmpty {
            let count = chunkSize()
            for _ in 0..<count {
                batch.append(input.removeFirst())
            }
            busy += count
            return .work
        }
        return sourceHasEnded ? .exit : .wait
    }

    /// Parks an idle worker; returns the continuation to resume at once (with whether to
    /// look again) if it need not wait.
    @inlinable
    mutating func workerParked(_ continuation: UnsafeContinuation<Bool, Never>) -> (UnsafeContinuation<Bool, Never>, Bool)? {
        if isOver || (input.isEmpty && sourceHasEnded) { return (continuation, false) }
        if !input.isEmpty {
            wakingWorkers += 1
            return (continuation, true)
        }
        idleWorkers.append(continuation)
        return nil
    }

    /// A worker's result. Returns the consumer to wake, if it waits.
    @inlinable
    mutating func resultProduced(index: Int, value: Transformed) -> UnsafeContinuation<Void, Never>? {
        busy -= 1
        guard !isOver else { return nil }
        output.append((index, value))
        return takeConsumer()
    }

    // MARK: Consumer

    @usableFromInline
    enum ConsumerAction {
        /// `output` was swapped into the consumer's buffer.
        case elements
        case finished
        case failed(any Error)
        case wait
    }

    /// The consumer returned `returned` more elements since it last came, and wants more.
    /// Returns the feeder to resume (it may pull again) with what to do.
    @inlinable
    mutating func consumerTake(
        returned: Int,
        into buffer: inout [(index: Int, value: Transformed)]
    ) -> (action: ConsumerAction, feeder: UnsafeContinuation<Bool, Never>?) {
        delivered += returned
        var resumeFeeder: UnsafeContinuation<Bool, Never>?
        if let feeder, !isOver, fed - delivered < window {
            resumeFeeder = feeder
            self.feeder = nil
        }
        if let failure { return (.failed(failure), resumeFeeder) }
        if consumerHasEnded { return (.finished, resumeFeeder) }
        if !output.isEmpty {
            swap(&output, &buffer)
            return (.elements, resumeFeeder)
        }
        return (isDrained ? .finished : .wait, resumeFeeder)
    }

    /// Parks the consumer; returns the continuation to resume at once if it need not wait.
    @inlinable
    mutating func consumerParked(_ continuation: UnsafeContinuation<Void, Never>) -> UnsafeContinuation<Void, Never>? {
        if isOver || !output.isEmpty || isDrained || consumerWasCancelled {
            return continuation
        }
        consumer = continuation
        return nil
    }

    @inlinable
    mutating func consumerCancelled() -> UnsafeContinuation<Void, Never>? {
        consumerWasCancelled = true
        return takeConsumer()
    }

    @inlinable
    mutating func takeConsumer() -> UnsafeContinuation<Void, Never>? {
        defer { consumer = nil }
        return consumer
    }

    // MARK: Ending

    /// What to resume when the iteration is over: the feeder and idle workers (to stop),
    /// and the consumer.
    @usableFromInline
    struct Stop {
        @usableFromInline var parked: [UnsafeContinuation<Bool, Never>] = []
        @usableFromInline var consumer: UnsafeContinuation<Void, Never>?

        @inlinable init() {}

        @inlinable
        func resume() {
            for continuation in parked { continuation.resume(returning: false) }
            consumer?.resume()
        }
    }

    /// The source or a transform failed. Returns nil unless `error` is the first.
    @inlinable
    mutating func failed(_ error: any Error) -> Stop? {
        guard !isOver else { return nil }
        failure = error
        return stopEveryone()
    }

    /// The consumer ended the iteration.
    @inlinable
    mutating func consumerEnded() -> Stop {
        consumerHasEnded = true
        return stopEveryone()
    }

    @inlinable
    mutating func stopEveryone() -> Stop {
        var stop = Stop()
        swap(&stop.parked, &idleWorkers)
        if let feeder {
            stop.parked.append(feeder)
            self.feeder = nil
        }
        stop.consumer = takeConsumer()
        return stop
    }
}
