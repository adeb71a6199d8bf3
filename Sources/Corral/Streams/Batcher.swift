import Synchronization

/// Collects items from many callers into batches for one handler call each — GraphQL
/// DataLoader's pattern — and gives every caller its own item's result.
///
/// ```swift
/// let inserts = Batcher(maxSize: 100, maxDelay: .milliseconds(10)) { (rows: [Row]) in
///     try await db.insert(rows)                  // returns one id per row, in order
/// }
/// try await withErrorGroup { group in
///     try await group.addTask { try await inserts.run() }   // the flush timer and the handler calls
///     let id = try await inserts.submit(row)                // this row's id
///     inserts.shutdown()                                    // flush what is buffered; run() returns
/// }
/// ```
///
/// ## Flushing
/// A batch is handed to the handler when it holds `maxSize` items, or `maxDelay` after its
/// first item arrived — a per-batch deadline, not a free-running ticker: an idle batcher does
/// nothing, and no item waits longer than `maxDelay` for its batch to be sent (plus the wait
/// for a handler slot). At most `maxConcurrentBatches` handler calls run at once; batches
/// sealed meanwhile wait in order.
///
/// ## Results and errors
/// The handler receives the items in submission order and must return one output per item,
/// in the same order: caller *i* gets output *i*. If it throws, every caller of that batch —
/// and only of that batch — gets its error; if it returns the wrong number of outputs, every
/// caller of that batch gets ``BatcherError`` (code `.outputCountMismatch`). Other batches are
/// unaffected.
///
/// ## Lifecycle
/// Items may be submitted before ``run()`` starts: they wait for it. ``run()`` runs the flush
/// timer and the handler calls as its child tasks, and returns after ``shutdown()`` once
/// every accepted item has been handled (what was buffered is flushed at once, without
/// waiting for `maxDelay`). Submissions after ``shutdown()`` throw ``BatcherError`` (code
/// `.shutdown`). Cancelling the task running ``run()`` shuts the batcher down the same way,
/// except that the final handler calls run in a cancelled task (a handler that checks for
/// cancellation fails its batch with `CancellationError`); ``run()`` then throws
/// `CancellationError`.
///
/// A batcher released without having run (or with items still buffered) fails the tickets
/// of those items with ``BatcherError`` (code `.shutdown`). (A handler that captures its
/// batcher keeps it alive: then only ``shutdown()`` and ``run()`` end them.)
///
/// ## Accounting
/// Every accepted item ends in exactly one of: handled (its caller got its output), failed
/// (its caller got the batch's error) or withdrawn (its caller was cancelled before its batch
/// was handed to the handler). Once ``run()`` has returned, `stats.submitted == handled + failed + withdrawn`.
///
/// A batch is *open* until it is full, or until its delay has passed and a handler slot is
/// free (a batch that is due while every slot is busy goes on taking items), or until
/// shutdown.
///
/// ## Handlers that submit
/// A handler that waits for items of its own batcher (``submit(_:)`` from inside the handler,
/// as a DataLoader resolver may load more) needs a free handler slot for that inner batch:
/// with every slot held by handlers waiting that way — with the default
/// `maxConcurrentBatches` of 1, at the first such call — they wait for each other for ever.
/// Give such handlers slots to spare, or a second batcher.
///
/// ## Memory
/// Items wait in per-batch buffers of `maxSize` slots, which submitters fill without taking
/// a lock. The buffers are reused from batch to batch and kept until the batcher is released:
/// after a burst that sealed many batches at once, the batcher keeps a small object per
/// buffer it made, and the item storage of up to four spare ones.
///
/// ## Backpressure
/// Each caller waits for its own result, so the items held are bounded by the number of
/// callers waiting (or, with ``enqueue(_:)``, by the tickets the caller keeps): bound the
/// callers — with a worker pool, a pipeline stage or an error group's `limit` — to bound the
/// batcher.
public final class Batcher<Item: Sendable, Output: Sendable, C: Clock>: Sendable where C.Duration == Duration {
    /// The most items in one batch.
    public let maxSize: Int
    /// How long after its first item a batch is sent, if it is not full before.
    public let maxDelay: Duration
    /// The most handler calls running at once.
    public let maxConcurrentBatches: Int
    /// The batcher's name, used in errors and diagnostics.
    public let name: String
    /// The clock that times `maxDelay`.
    public let clock: C

    @usableFromInline let handler: @Sendable ([Item]) async throws -> [Output]
    @usableFromInline let state: LockedState<BatcherState<Item, Output, C>>
    /// The open batch's buffer, where submitters claim slots without the lock: `Unmanaged`
    /// bits, 0 when no batch is open. Written under the lock (by `BatcherState`).
    @usableFromInline let current: PaddedAtomics

    /// Creates a batcher timed by `clock`; nothing is sent before ``run()`` starts.
    ///
    /// - Parameters:
    ///   - maxSize: The most items in one batch; a full batch is sent at once. A batch's
    ///     buffer has `maxSize` slots, allocated when it is first used (and kept for the
    ///     batches after it): at most 16,777,216 (2²⁴).
    ///   - maxDelay: How long after its first item a batch is sent if it is not full
    ///     (`.zero`: as soon as a handler slot is free — batching only what gathers meanwhile).
    ///   - maxConcurrentBatches: The most handler calls running at once.
    ///   - name: A name for errors and diagnostics.
    ///   - clock: The clock that times `maxDelay` (a `ManualClock` in tests).
    ///   - handler: Handles one batch: returns one output per item, in order.
    /// - Precondition: `1 <= maxSize <= 2²⁴`, `maxDelay >= .zero`, `maxConcurrentBatches >= 1`.
    public init(
        maxSize: Int,
        maxDelay: Duration,
        maxConcurrentBatches: Int = 1,
        name: String = "batcher",
        clock: C,
        handler: @escaping @Sendable ([Item]) async throws -> [Output]
    ) {
        precondition(maxSize >= 1, "Batcher(maxSize:): maxSize must be at least 1, got \(maxSize)")
        precondition(
            maxSize <= maximumConcurrentWindow,
            "Batcher(maxSize:): maxSize must be at most \(maximumConcurrentWindow) (a batch's slots are allocated up front), got \(maxSize)"
        )
        precondition(maxDelay >= .zero, "Batcher(maxDelay:): maxDelay must not be negative, got \(maxDelay)")
        precondition(
            maxConcurrentBatches >= 1,
            "Batcher(maxConcurrentBatches:): maxConcurrentBatches must be at least 1, got \(maxConcurrentBatches)"
        )
        self.maxSize = maxSize
        self.maxDelay = maxDelay
        self.maxConcurrentBatches = maxConcurrentBatches
        self.name = name
        self.clock = clock
        self.handler = handler
        let current = PaddedAtomics(count: 1)
        self.current = current
        self.state = LockedState(BatcherState(
            maxSize: maxSize, maxDelay: maxDelay, maxConcurrentBatches: maxConcurrentBatches, clock: clock,
            current: current
        ))
        DiagnosticsRegistry.shared.add(self, kind: "Batcher", name: name) { batcher in
            let stats = batcher.stats
            let finished = stats.handled + stats.failed + stats.withdrawn
            return StructureSample(
                tasks: stats.inFlightBatches, waiting: stats.unfinished, held: stats.buffered,
                progress: finished, stallToken: finished,
                details: [
                    "submitted": stats.submitted, "handled": stats.handled, "failed": stats.failed,
                    "withdrawn": stats.withdrawn, "buffered": stats.buffered, "batches": stats.batches,
                    "inFlightBatches": stats.inFlightBatches,
                ]
            )
        }
    }

    /// Submits an item and waits for its own result.
    ///
    /// - Returns: The handler's output for this item.
    /// - Throws: The handler's error if this item's batch failed; ``BatcherError`` when the
    ///   batcher is shut down (code `.shutdown`: the item was not accepted) or the handler
    ///   returned the wrong number of outputs (`.outputCountMismatch`); `CancellationError`
    ///   (or ``TimeoutError``) when the calling task is cancelled — if the item's batch has
    ///   not yet been handed to the handler (it is open, or waiting for a handler slot), the
    ///   item is withdrawn from it, otherwise it is handled and its result discarded.
    @inlinable
    nonisolated(nonsending)
    public func submit(_ item: Item) async throws -> Output {
        if Task.isCancelled { throw DeadlineContext.cancellationError() }
        let placed = try place(item)
        let state = self.state
        let buffer = placed.buffer.takeUnretainedValue()
        let generation = placed.generation
        let slot = placed.slot
        return try await placed.outcome.value(slot: slot) {
            state.withLock { $0.withdraw(buffer, generation: generation, slot: slot) }.resume()
        }
    }

    /// Adds an item without waiting; the ticket gives its result later.
    ///
    /// For a caller that keeps many items outstanding from one task — Go's `Add` returning a
    /// channel — without a task per item. Dropping the ticket discards the result; the item
    /// is handled all the same.
    ///
    /// - Returns: A ticket: `try await ticket.value` is this item's output.
    /// - Throws: ``BatcherError`` (code `.shutdown`) when the batcher is shut down; the item
    ///   was not accepted.
    @inlinable
    public func enqueue(_ item: Item) throws -> BatchTicket<Output> {
        let placed = try place(item)
        return BatchTicket(outcome: placed.outcome, slot: placed.slot)
    }

    /// Where an item went: its batch's outcome, its slot, and (to withdraw it) its buffer and
    /// the batch's generation.
    @usableFromInline
    typealias Placement = (
        outcome: BatchOutcome<Output>, slot: Int, buffer: Unmanaged<BatchBuffer<Item, Output>>, generation: Int
    )

    /// Puts an item in the open batch: a slot claimed without the lock when the open batch
    /// has room (the common case), else through the lock (see ``BatcherState``).
    @inlinable
    func place(_ item: Item) throws -> Placement {
        let bits = current[0].pointee.load(ordering: .acquiring)
        if bits != 0 {
            // Not retained: buffers live as long as the batcher (see BatchBuffer).
            let buffer = Unmanaged<BatchBuffer<Item, Output>>.fromOpaque(UnsafeRawPointer(bitPattern: bits).unsafelyUnwrapped)
            let placed = buffer._withUnsafeGuaranteedRef { buffer -> Placement? in
                guard let slot = buffer.claim() else { return nil }
                let (outcome, generation) = buffer.write(item, at: slot)
                return (outcome, slot, Unmanaged.passUnretained(buffer), generation)
            }
            if let placed {
                if placed.slot == maxSize - 1 { filled(placed) }
                return placed
            }
        }
        return try placeThroughTheLock(item)
    }

    /// `place` when the open batch is missing or full: opens one.
    @inlinable
    func placeThroughTheLock(_ item: Item) throws -> Placement {
        switch state.withLock({ $0.enqueue() }) {
        case .claimed(let buffer, let slot, let wake):
            wake.resume()
            let (outcome, generation) = buffer.write(item, at: slot)
            let placed = (outcome, slot, Unmanaged.passUnretained(buffer), generation)
            if slot == maxSize - 1 { filled(placed) }
            return placed
        case .refused:
            throw BatcherError.shutdown(batcher: name)
        }
    }

    /// The item just placed took its batch's last slot: seal the batch.
    @inlinable
    func filled(_ placed: Placement) {
        let buffer = placed.buffer.takeUnretainedValue()
        state.withLock { $0.filled(buffer, generation: placed.generation) }.resume()
    }

    deinit {
        // Released with items buffered: no run() can hand them to the handler any more (run()
        // holds the batcher while it runs, and submit() while it waits, so what is left are
        // enqueue()'s tickets). Fail them, so that no ticket's `value` waits for ever.
        let abandoned = state.withLock { state -> [BatcherState<Item, Output, C>.SealedBatch] in
            state.seal(.shutdown)
            defer { state.sealed.removeAll() }
            return Array(state.sealed)
        }
        for batch in abandoned {
            // Nobody else holds the batcher: every claimed slot is written. The items are
            // released here (the buffers go with the state).
            let items = batch.buffer.takeItemsIfWritten(count: batch.count)
            precondition(items != nil, "Batcher.deinit: a claimed slot was never written")
            batch.outcome.complete(.failure(BatcherError.shutdown(batcher: name)), slotToOutput: nil)
        }
        current.deallocate()
    }

    /// Runs the flush timer and the handler calls until the batcher is shut down and every
    /// accepted item has been handled.
    ///
    /// Call it once, typically as a child task of the code that owns the batcher (or as a
    /// `Service`'s `run()`).
    ///
    /// - Throws: `CancellationError` when the calling task is cancelled: the batcher is shut
    ///   down (what is buffered is sent, to handler calls that run cancelled), and this throws
    ///   once every handler call has returned.
    /// - Precondition: `run()` is called once in the batcher's life.
    @inlinable  // specialized with the batcher: each batch's work is then free of generic lookups
    public func run() async throws {
        state.withLock { $0.runStarting() }
        await withTaskCancellationHandler {
            await withDiscardingTaskGroup { group in
                let timerEntry = LedgerEntry(kind: "Batcher", name: name)
                group.addTask {
                    defer { timerEntry.close() }
                    await self.runTimer()
                }
                while case .startWorker(let batch) = await nextSupervisorAction() {
                    let entry = LedgerEntry(kind: "Batcher", name: name)
                    group.addTask {
                        defer { entry.close() }
                        await self.work(startingWith: batch)
                    }
                }
                // Finished: every batch is handled and the workers are exiting. The timer may
                // be asleep on the clock.
                group.cancelAll()
            }
        } onCancel: {
            shutdown()
        }
        if Task.isCancelled { throw CancellationError() }
    }

    /// Stops accepting items and sends what is buffered at once; ``run()`` returns when every
    /// batch has been handled. Idempotent; may be called before ``run()``.
    public func shutdown() {
        state.withLock { $0.shutdown() }.resume()
    }

    /// A snapshot of the batcher's counters.
    public var stats: BatcherStats {
        state.withLock { $0.snapshot }
    }

    // MARK: run()'s tasks

    @inlinable
    func nextSupervisorAction() async -> BatcherState<Item, Output, C>.SupervisorAction {
        await withUnsafeContinuation { continuation in
            let (next, wake) = state.withLock { $0.supervisorNext(continuation) }
            wake.resume()
            if let (continuation, action) = next { continuation.resume(returning: action) }
        }
    }

    /// A handler worker: handles batches one after another, waiting idle between them, until
    /// the batcher is finished. Running on, rather than a task per batch, it takes the next
    /// batch without a task to start or a supervisor to wake.
    @inlinable
    func work(startingWith first: BatcherState<Item, Output, C>.SealedBatch) async {
        var batch = first
        while true {
            let (items, failed) = await handle(batch)
            let action = await withUnsafeContinuation { continuation in
                let (next, wake) = state.withLock { $0.workerFinished(items: items, failed: failed, continuation) }
                wake.resume()
                if let (continuation, action) = next { continuation.resume(returning: action) }
            }
            guard case .handle(let next) = action else { return }
            batch = next
        }
    }

    /// Seals each open batch when its deadline passes.
    @inlinable
    func runTimer() async {
        while true {
            let action = await withUnsafeContinuation { continuation in
                if let (continuation, action) = state.withLock({ $0.timerNext(continuation) }) {
                    continuation.resume(returning: action)
                }
            }
            guard case .sleep(let deadline, let generation) = action else { return }
            do {
                try await clock.sleep(until: deadline, tolerance: nil)
            } catch {
                return  // run() is finishing (or was cancelled: shutdown sealed the batch)
            }
            state.withLock { $0.timerFired(generation: generation) }.resume()
        }
    }

    /// Calls the handler for one batch and completes its callers. Returns how many items the
    /// handler was given (none: every caller was cancelled, and no call was made) and whether
    /// the batch failed.
    @inlinable
    func handle(_ batch: BatcherState<Item, Output, C>.SealedBatch) async -> (items: Int, failed: Bool) {
        let taken = await batch.buffer.takeItems(count: batch.count)
        let withdrawn = state.withLock { $0.collected(batch.buffer, count: batch.count) }
        // The withdrawn items are released here, outside the lock.
        let (items, slotToOutput) = BatcherState<Item, Output, C>.removing(withdrawn, from: taken)
        let result: Result<[Output], any Error>
        if items.isEmpty {
            result = .success([])  // every caller was cancelled: no handler call
        } else {
            do {
                let outputs = try await handler(items)
                if outputs.count == items.count {
                    result = .success(outputs)
                } else {
                    result = .failure(BatcherError.outputCountMismatch(
                        batcher: name, expected: items.count, actual: outputs.count
                    ))
                }
            } catch {
                result = .failure(error)
            }
        }
        batch.outcome.complete(result, slotToOutput: slotToOutput)
        let failed = if case .failure = result { true } else { false }
        return (items.count, failed)
    }
}

extension Batcher where C == ContinuousClock {
    /// Creates a batcher timed by the continuous clock; nothing is sent before ``run()``
    /// starts. See ``init(maxSize:maxDelay:maxConcurrentBatches:name:clock:handler:)``.
    public convenience init(
        maxSize: Int,
        maxDelay: Duration,
        maxConcurrentBatches: Int = 1,
        name: String = "batcher",
        handler: @escaping @Sendable ([Item]) async throws -> [Output]
    ) {
        self.init(
            maxSize: maxSize, maxDelay: maxDelay, maxConcurrentBatches: maxConcurrentBatches,
            name: name, clock: ContinuousClock(), handler: handler
        )
    }
}

/// The result of one item added with ``Batcher/enqueue(_:)``: await ``value``.
///
/// A ticket may be awaited any number of times, from any task.
public struct BatchTicket<Output: Sendable>: Sendable {
    @usableFromInline let outcome: BatchOutcome<Output>
    @usableFromInline let slot: Int

    @inlinable
    init(outcome: BatchOutcome<Output>, slot: Int) {
        self.outcome = outcome
        self.slot = slot
    }

    /// The item's output, waiting for its batch to be handled.
    ///
    /// - Throws: The handler's error if the item's batch failed; ``BatcherError`` (code
    ///   `.outputCountMismatch`) if the handler returned the wrong number of outputs;
    ///   `CancellationError` (or ``TimeoutError``) when the waiting task is cancelled — the
    ///   item stays in its batch and is handled all the same.
    @inlinable
    nonisolated(nonsending)
    public var value: Output {
        get async throws {
            try await outcome.value(slot: slot) {}
        }
    }
}

/// A snapshot of a ``Batcher``'s counters.
public struct BatcherStats: Hashable, Sendable, CustomStringConvertible {
    /// Items accepted.
    public var submitted = 0
    /// Items whose caller got its output.
    public var handled = 0
    /// Items whose batch failed (the handler threw or returned the wrong number of outputs).
    public var failed = 0
    /// Items withdrawn by their caller's cancellation before their batch was handed to the
    /// handler.
    public var withdrawn = 0
    /// Items accepted and not yet sent to the handler.
    public var buffered = 0
    /// Handler calls started.
    public var batches = 0
    /// Handler calls that failed.
    public var failedBatches = 0
    /// Handler calls running now.
    public var inFlightBatches = 0
    /// The most handler calls running at once.
    public var peakConcurrentBatches = 0
    /// Batches sent because they were full.
    public var flushedBySize = 0
    /// Batches sent because `maxDelay` had passed since their first item.
    public var flushedByDelay = 0
    /// Batches sent by shutdown.
    public var flushedByShutdown = 0

    /// Creates empty counters.
    public init() {}

    /// Items accepted and not yet ended.
    public var unfinished: Int { submitted - handled - failed - withdrawn }

    /// The counters on one line.
    public var description: String {
        "submitted \(submitted), handled \(handled), failed \(failed), withdrawn \(withdrawn), buffered \(buffered); "
            + "batches \(batches) (by size \(flushedBySize), by delay \(flushedByDelay), by shutdown \(flushedByShutdown), "
            + "failed \(failedBatches), in flight \(inFlightBatches), peak \(peakConcurrentBatches))"
    }
}
