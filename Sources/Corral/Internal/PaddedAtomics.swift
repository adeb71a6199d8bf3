import Synchronization

/// A few atomic integers, each alone on its own 128 bytes (a pair of cache lines, the unit
/// the adjacent-line prefetcher moves) in one allocation aligned to 128: counters written by
/// different threads never share a line, with each other or with neighbouring allocations.
///
/// A struct of one pointer, so that reaching a counter costs no reference counting; its
/// owner calls `deallocate()` once nobody can reach it any more. Used by the concurrent-map
/// engine's ring and by a pipeline stage's statistics.
@usableFromInline
struct PaddedAtomics: @unchecked Sendable {
    // @unchecked Sendable: one `let` pointer; the memory is reached only through atomics.
    @usableFromInline let base: UnsafeMutableRawPointer
    @usableFromInline let count: Int

    /// Bytes between two counters.
    @usableFromInline static var spacing: Int { 128 }

    /// `count` counters, each starting at `initial`.
    @usableFromInline
    init(count: Int, initial: Int = 0) {
        self.count = count
        base = .allocate(byteCount: count * Self.spacing, alignment: Self.spacing)
        for index in 0..<count {
            (base + index * Self.spacing).bindMemory(to: Atomic<Int>.self, capacity: 1).initialize(to: Atomic(initial))
        }
    }

    /// The counter at `index`.
    @inlinable
    subscript(index: Int) -> UnsafeMutablePointer<Atomic<Int>> {
        (base + index * Self.spacing).assumingMemoryBound(to: Atomic<Int>.self)
    }

    @usableFromInline
    func deallocate() {
        for index in 0..<count { self[index].deinitialize(count: 1) }
        base.deallocate()
    }
}
