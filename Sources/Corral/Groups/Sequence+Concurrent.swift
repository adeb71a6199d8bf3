import Synchronization

extension Sequence where Element: Sendable {
    /// Transforms every element concurrently, at most `limit` at a time, and returns the
    /// results in the order of the input — conc's `iter.Map`, Rust's `buffered(limit)`.
    ///
    /// ```swift
    /// let pages = try await urls.concurrentMap(limit: 8) { try await fetch($0) }
    /// ```
    ///
    /// The sequence is read once, up front. `limit` worker tasks (fewer for a shorter input)
    /// take the elements in order and write each result into its place; they are child tasks
    /// of the caller, so they inherit its task-local values and priority.
    ///
    /// - Parameters:
    ///   - limit: The most transforms that run at once; must be greater than 0 (a limit of 0
    ///     could never make progress).
    ///   - transform: The transform; runs concurrently with itself.
    /// - Returns: The transformed elements, in input order.
    /// - Throws: The first error a transform throws: the other transforms are cancelled, the
    ///   elements not yet started are never transformed, and every started transform has
    ///   finished when this throws. `CancellationError` if the calling task is cancelled.
    @inlinable
    public func concurrentMap<Transformed: Sendable>(
        limit: Int,
        _ transform: @escaping @Sendable (Element) async throws -> Transformed
    ) async throws -> [Transformed] {
        precondition(limit > 0, "concurrentMap(limit:_:): limit must be greater than 0, got \(limit)")
        return try await concurrentlyTransform(Array(self), limit: limit, transform).map { $0! }
    }

    /// Transforms every element concurrently, at most `limit` at a time, and returns the
    /// non-`nil` results in the order of the input.
    ///
    /// See ``Swift/Sequence/concurrentMap(limit:_:)`` for how the work is run and what is
    /// thrown.
    ///
    /// - Parameters:
    ///   - limit: The most transforms that run at once; must be greater than 0.
    ///   - transform: The transform; `nil` results are dropped.
    /// - Returns: The non-`nil` results, in input order.
    /// - Throws: The first error a transform throws (the others are cancelled), or
    ///   `CancellationError` if the calling task is cancelled.
    @inlinable
    public func concurrentCompactMap<Transformed: Sendable>(
        limit: Int,
        _ transform: @escaping @Sendable (Element) async throws -> Transformed?
    ) async throws -> [Transformed] {
        precondition(limit > 0, "concurrentCompactMap(limit:_:): limit must be greater than 0, got \(limit)")
        return try await concurrentlyTransform(Array(self), limit: limit, transform).compactMap { $0 ?? nil }
    }

    /// Runs `body` on every element concurrently, at most `limit` at a time.
    ///
    /// See ``Swift/Sequence/concurrentMap(limit:_:)`` for how the work is run and what is
    /// thrown.
    ///
    /// - Parameters:
    ///   - limit: The most calls that run at once; must be greater than 0.
    ///   - body: The work for one element.
    /// - Throws: The first error `body` throws (the other calls are cancelled), or
    ///   `CancellationError` if the calling task is cancelled.
    @inlinable
    public func concurrentForEach(
        limit: Int,
        _ body: @escaping @Sendable (Element) async throws -> Void
    ) async throws {
        precondition(limit > 0, "concurrentForEach(limit:_:): limit must be greater than 0, got \(limit)")
        _ = try await concurrentlyTransform(Array(self), limit: limit, body)
    }
}

/// Runs `transform` on every element with `min(limit, count)` child tasks that claim the
/// next index from a shared counter, writing each result into its own slot.
///
/// Each slot is written by exactly one worker, and read only after the task group has
/// joined every worker, so the slots need no lock. A worker that claims an element once the
/// group is cancelled throws `CancellationError` instead of transforming it, so the map
/// either fills every slot or throws.
@inlinable
func concurrentlyTransform<Element: Sendable, Transformed: Sendable>(
    _ elements: [Element],
    limit: Int,
    _ transform: @escaping @Sendable (Element) async throws -> Transformed
) async throws -> [Transformed?] {
    let count = elements.count
    guard count > 0 else { return [] }
    let results = ResultSlots<Transformed>(count: count)
    try await withThrowingDiscardingTaskGroup { group in
        for _ in 0..<min(limit, count) {
            let entry = LedgerEntry(kind: "concurrentMap", name: "workers")
            group.addTask {
                defer { entry.close() }
                while true {
                    let index = results.claimNext()
                    guard index < count else { return }
                    // An element left untransformed must not pass for a result: stop the
                    // whole map with the cancellation.
                    try Task.checkCancellation()
                    results.store(try await transform(elements[index]), at: index)
                }
            }
        }
    }
    return results.collect()
}

/// Result storage shared by the workers of a concurrent map: one slot per input element.
@usableFromInline
final class ResultSlots<Value: Sendable>: @unchecked Sendable {
    // @unchecked Sendable: `slots` is allocated once; slot `i` is written only by the worker
    // that claimed index `i` (`claimed` is atomic), and `collect()` reads them after
    // the task group has joined every worker, which orders every write before the read.
    @usableFromInline let slots: UnsafeMutableBufferPointer<Value?>
    @usableFromInline let claimed = Atomic<Int>(0)

    @inlinable
    init(count: Int) {
        slots = .allocate(capacity: count)
        slots.initialize(repeating: nil)
    }

    /// The next unclaimed index (may be past the end).
    @inlinable
    func claimNext() -> Int {
        claimed.wrappingAdd(1, ordering: .relaxed).oldValue
    }

    @inlinable
    func store(_ value: Value, at index: Int) {
        slots[index] = value
    }

    @inlinable
    func collect() -> [Value?] {
        Array(slots)
    }

    @inlinable
    deinit {
        slots.deinitialize()
        slots.deallocate()
    }
}
