/// A bounded pool of reusable values or objects — Go's `sync.Pool` for buffers, without the
/// `Put` a caller can forget.
///
/// ```swift
/// let buffers = ObjectPool(capacity: 64) {
///     [UInt8](repeating: 0, count: 4096)
/// } reset: {
///     $0.removeAll(keepingCapacity: true)
/// }
/// let checksum = buffers.withObject { buffer in
///     buffer.append(contentsOf: payload)
///     return crc32(buffer)
/// }                                            // the buffer is back in the pool, reset
/// ```
///
/// Borrowing never waits: an empty pool makes a new object (a *miss*); returning an object to
/// a pool that already keeps `capacity` of them drops it. So `capacity` bounds the memory the
/// pool holds on to, not the number of objects in use at once. Objects are reset as they
/// come back, before another borrower can see them.
///
/// Two ways to borrow, both of which return the object on every path:
/// - ``withObject(_:)`` (and its async twin ``withObject(isolation:_:)``) for work that fits
///   in one scope;
/// - ``lease()`` for code that must hold an object across calls: an ``ObjectPool/Lease`` is
///   `~Copyable`, and returns its object when it is consumed (``Lease/release()``) or goes
///   out of scope — it cannot be copied, so it cannot be returned twice.
public final class ObjectPool<Object: Sendable>: Sendable {
    /// The most objects the pool keeps for reuse.
    public let capacity: Int
    @usableFromInline let make: @Sendable () -> Object
    @usableFromInline let reset: @Sendable (inout Object) -> Void
    @usableFromInline let state: LockedState<State>

    @usableFromInline
    struct State {
        @usableFromInline var kept: [Object] = []
        @usableFromInline var stats = Stats()

        @inlinable
        init() {}
    }

    /// A snapshot of a pool's counters.
    public struct Stats: Hashable, Sendable, CustomStringConvertible {
        /// Borrows served by a kept object.
        public var hits = 0
        /// Borrows that had to make a new object.
        public var misses = 0
        /// Objects borrowed and not yet returned.
        public var inUse = 0
        /// Objects kept for reuse right now.
        public var kept = 0
        /// Objects returned to a full pool, and dropped.
        public var dropped = 0

        /// Creates empty counters.
        public init() {}

        /// The counters on one line.
        public var description: String {
            "hits \(hits), misses \(misses), in use \(inUse), kept \(kept), dropped \(dropped)"
        }
    }

    /// Creates an empty pool.
    ///
    /// - Parameters:
    ///   - capacity: The most objects kept for reuse; must be greater than 0.
    ///   - make: Makes a new object when none is kept.
    ///   - reset: Puts a returned object back in its initial state (clear a buffer, keeping
    ///     its storage). Runs on the returning task, before the object is kept.
    public init(
        capacity: Int,
        make: @escaping @Sendable () -> Object,
        reset: @escaping @Sendable (inout Object) -> Void = { _ in }
    ) {
        precondition(capacity > 0, "ObjectPool(capacity:): capacity must be greater than 0, got \(capacity)")
        self.capacity = capacity
        self.make = make
        self.reset = reset
        self.state = LockedState(State())
    }

    /// Borrows an object for the duration of `body`, then resets it and returns it to the pool
    /// — on return and when `body` throws.
    ///
    /// - Parameter body: Uses the object; may change it.
    /// - Returns: What `body` returns.
    /// - Throws: What `body` throws (the object is returned first).
    @inlinable
    public func withObject<Result, Failure: Error>(
        _ body: (inout Object) throws(Failure) -> Result
    ) throws(Failure) -> Result {
        var object = borrow()
        do {
            let result = try body(&object)
            giveBack(consume object)  // moved, not copied: resetting it copies nothing
            return result
        } catch {
            giveBack(consume object)
            throw error
        }
    }

    /// Borrows an object for the duration of an async `body`, then resets it and returns it to
    /// the pool — on return, when `body` throws, and when it is cancelled.
    ///
    /// `body` runs on the caller's actor.
    ///
    /// - Parameters:
    ///   - isolation: The actor `body` runs on; the caller's by default.
    ///   - body: Uses the object; may change it.
    /// - Returns: What `body` returns.
    /// - Throws: What `body` throws (the object is returned first).
    @inlinable
    public func withObject<Result>(
        isolation: isolated (any Actor)? = #isolation,
        _ body: (inout Object) async throws -> Result
    ) async rethrows -> Result {
        var object = borrow()
        do {
            let result = try await body(&object)
            giveBack(consume object)
            return result
        } catch {
            giveBack(consume object)
            throw error
        }
    }

    /// Borrows an object until the returned lease is released or goes out of scope.
    public func lease() -> Lease {
        Lease(pool: self, object: borrow())
    }

    /// A snapshot of the pool's counters.
    public var stats: Stats {
        state.withLock { $0.stats }
    }

    /// An object borrowed from an ``ObjectPool``, returned to it when the lease is released
    /// or goes out of scope.
    ///
    /// `~Copyable`: a lease has one owner, so its object is returned exactly once.
    public struct Lease: ~Copyable {
        private let pool: ObjectPool
        /// The borrowed object.
        public var object: Object

        fileprivate init(pool: ObjectPool, object: Object) {
            self.pool = pool
            self.object = object
        }

        /// Returns the object to the pool now.
        public consuming func release() {
            // The deinit returns the object.
        }

        deinit {
            pool.giveBack(object)
        }
    }

    @inlinable
    func borrow() -> Object {
        let kept: Object? = state.withLock { state in
            state.stats.inUse += 1
            guard let object = state.kept.popLast() else {
                state.stats.misses += 1
                return nil
            }
            state.stats.hits += 1
            state.stats.kept = state.kept.count
            return object
        }
        return kept ?? make()
    }

    @inlinable
    func giveBack(_ object: consuming Object) {
        var object = object
        reset(&object)
        state.withLock { state in
            state.stats.inUse -= 1
            if state.kept.count < capacity {
                state.kept.append(object)
                state.stats.kept = state.kept.count
            } else {
                state.stats.dropped += 1
            }
        }
    }
}
