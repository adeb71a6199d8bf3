/// Identifies one waiter of a ``WaiterQueue``.
///
/// The generation is unique per queue, so an id whose waiter is gone never matches the
/// waiter that later reuses its slot: a late cancellation handler is a harmless no-op.
@usableFromInline
struct WaiterID: Hashable, Sendable {
    @usableFromInline let slot: Int
    @usableFromInline let generation: UInt64

    @inlinable
    init(slot: Int, generation: UInt64) {
        self.slot = slot
        self.generation = generation
    }
}

/// A continuation and the outcome to resume it with, produced under a lock and performed
/// after it is released.
@usableFromInline
struct Resumption<Outcome>: Sendable where Outcome: Sendable {
    @usableFromInline let continuation: UnsafeContinuation<Outcome, Never>
    @usableFromInline let outcome: Outcome

    @inlinable
    init(_ continuation: UnsafeContinuation<Outcome, Never>, _ outcome: Outcome) {
        self.continuation = continuation
        self.outcome = outcome
    }

    @inlinable
    func resume() { continuation.resume(returning: outcome) }
}

/// Zero or more resumptions; holds the first inline so that the common single wake-up
/// does not allocate.
@usableFromInline
struct Resumptions<Outcome>: Sendable where Outcome: Sendable {
    @usableFromInline var first: Resumption<Outcome>?
    @usableFromInline var rest: [Resumption<Outcome>] = []

    @inlinable
    init() { first = nil }

    @inlinable
    mutating func append(_ resumption: Resumption<Outcome>?) {
        guard let resumption else { return }
        if first == nil {
            first = resumption
        } else {
            rest.append(resumption)
        }
    }

    @inlinable
    var isEmpty: Bool { first == nil }

    /// Resumes every continuation, in the order they were appended. Call without a lock held.
    @inlinable
    func resumeAll() {
        first?.resume()
        for resumption in rest { resumption.resume() }
    }
}

/// The FIFO of suspended (or about to suspend) waiters shared by every Corral primitive.
///
/// A waiter's life:
///
///     enqueue ──▶ queued(no continuation) ──suspend──▶ queued(continuation)
///                     │                                    │
///                  settle/cancel                        settle/cancel
///                     ▼                                    ▼
///              settled(outcome) ──suspend──▶ free    free, Resumption returned
///
/// - `enqueue` happens in the same critical section as the failed fast path, so the
///   waiter's place in line is fixed before it suspends and no wake-up can be missed.
/// - `suspend` installs the continuation. If the waiter was settled in between (served or
///   cancelled), it gets its outcome at once.
/// - `settleFirst` / `settle(_:with:)` remove a waiter from the line with an outcome; the
///   returned ``Resumption`` must be performed after the lock is released.
///
/// All operations are O(1) (amortised for `enqueue`): nodes live in a slab with intrusive
/// links, and an id names its slot directly.
@usableFromInline
struct WaiterQueue<Payload, Outcome: Sendable> {
    @usableFromInline typealias Continuation = UnsafeContinuation<Outcome, Never>

    @usableFromInline
    enum Phase {
        case free(nextFree: Int)
        case queued(Payload, Continuation?, prev: Int, next: Int)
        case settled(Outcome)
    }

    @usableFromInline
    struct Slot {
        @usableFromInline var generation: UInt64
        @usableFromInline var phase: Phase

        @inlinable
        init(generation: UInt64, phase: Phase) {
            self.generation = generation
            self.phase = phase
        }
    }

    @usableFromInline var slots: [Slot] = []
    @usableFromInline var head = -1
    @usableFromInline var tail = -1
    @usableFromInline var freeList = -1
    @usableFromInline var nextGeneration: UInt64 = 0
    /// Waiters in line.
    @usableFromInline private(set) var count = 0
    /// Waiters settled before they installed their continuation.
    @usableFromInline var settledCount = 0

    @inlinable
    init() {}

    @inlinable
    var isEmpty: Bool { count == 0 }

    /// Appends a waiter at the end of the line.
    /// - Complexity: amortised O(1).
    @inlinable
    mutating func enqueue(_ payload: Payload) -> WaiterID {
        nextGeneration &+= 1
        let node: Phase = .queued(payload, nil, prev: tail, next: -1)
        let index: Int
        if freeList >= 0 {
            index = freeList
            guard case .free(let next) = slots[index].phase else {
                preconditionFailure("WaiterQueue free list points at a live slot")
            }
            freeList = next
            slots[index] = Slot(generation: nextGeneration, phase: node)
        } else {
            index = slots.count
            slots.append(Slot(generation: nextGeneration, phase: node))
        }
        if tail >= 0 {
            setNext(of: tail, to: index)
        } else {
            head = index
        }
        tail = index
        count += 1
        return WaiterID(slot: index, generation: nextGeneration)
    }

    /// The first waiter in line and its payload.
    @inlinable
    var first: (id: WaiterID, payload: Payload)? {
        guard head >= 0, case .queued(let payload, _, _, _) = slots[head].phase else { return nil }
        return (WaiterID(slot: head, generation: slots[head].generation), payload)
    }

    /// Installs the waiter's continuation.
    ///
    /// - Returns: `nil` when the waiter is still in line (it stays suspended), or the
    ///   resumption to perform at once when it was settled before it could suspend.
    @inlinable
    mutating func suspend(_ id: WaiterID, continuation: Continuation) -> Resumption<Outcome>? {
        precondition(matches(id), "WaiterQueue.suspend: unknown waiter \(id)")
        switch slots[id.slot].phase {
        case .queued(let payload, nil, let prev, let next):
            slots[id.slot].phase = .queued(payload, continuation, prev: prev, next: next)
            return nil
        case .settled(let outcome):
            settledCount -= 1
            free(id.slot)
            return Resumption(continuation, outcome)
        case .queued(_, .some, _, _), .free:
            preconditionFailure("WaiterQueue.suspend: waiter \(id) suspended twice")
        }
    }

    /// Removes the first waiter from the line, settling it with `outcome`.
    ///
    /// - Returns: its payload and, when it had suspended, the resumption to perform.
    @inlinable
    mutating func settleFirst(with outcome: Outcome) -> (payload: Payload, resumption: Resumption<Outcome>?)? {
        guard head >= 0 else { return nil }
        return settle(slot: head, with: outcome)
    }

    /// Removes the waiter `id` from the line, settling it with `outcome`.
    ///
    /// - Returns: `nil` when the waiter is no longer in line (already settled or gone): a
    ///   cancellation that lost the race to a wake-up. Otherwise its payload and, when it
    ///   had suspended, the resumption to perform.
    @inlinable
    mutating func settle(_ id: WaiterID, with outcome: Outcome) -> (payload: Payload, resumption: Resumption<Outcome>?)? {
        guard matches(id), case .queued = slots[id.slot].phase else { return nil }
        return settle(slot: id.slot, with: outcome)
    }

    /// Cancels waiter `id`: removes it from the line with `outcome` if it is still there.
    ///
    /// - Returns: the resumption to perform (empty if the waiter had not suspended yet, or
    ///   had already been served: a cancellation that lost the race).
    @inlinable
    mutating func cancel(_ id: WaiterID, with outcome: Outcome) -> Resumptions<Outcome> {
        var resumptions = Resumptions<Outcome>()
        resumptions.append(settle(id, with: outcome)?.resumption)
        return resumptions
    }

    /// Settles every waiter in line with `outcome`, first to last, returning each payload
    /// with its resumption.
    @inlinable
    mutating func settleAll(with outcome: Outcome) -> [(payload: Payload, resumption: Resumption<Outcome>?)] {
        var result: [(payload: Payload, resumption: Resumption<Outcome>?)] = []
        result.reserveCapacity(count)
        while let settled = settleFirst(with: outcome) {
            result.append(settled)
        }
        return result
    }

    /// The waiters in line, first to last (for diagnostics and tests).
    @inlinable
    var payloads: [Payload] {
        var result: [Payload] = []
        var index = head
        while index >= 0 {
            guard case .queued(let payload, _, _, let next) = slots[index].phase else {
                preconditionFailure("WaiterQueue: broken link at \(index)")
            }
            result.append(payload)
            index = next
        }
        return result
    }

    // MARK: - Internals

    @inlinable
    func matches(_ id: WaiterID) -> Bool {
        id.slot >= 0 && id.slot < slots.count && slots[id.slot].generation == id.generation
    }

    @inlinable
    mutating func settle(slot index: Int, with outcome: Outcome) -> (payload: Payload, resumption: Resumption<Outcome>?) {
        guard case .queued(let payload, let continuation, let prev, let next) = slots[index].phase else {
            preconditionFailure("WaiterQueue.settle: slot \(index) is not in line")
        }
        if prev >= 0 { setNext(of: prev, to: next) } else { head = next }
        if next >= 0 { setPrev(of: next, to: prev) } else { tail = prev }
        count -= 1
        if let continuation {
            free(index)
            return (payload, Resumption(continuation, outcome))
        }
        slots[index].phase = .settled(outcome)
        settledCount += 1
        return (payload, nil)
    }

    @inlinable
    mutating func free(_ index: Int) {
        slots[index].phase = .free(nextFree: freeList)
        freeList = index
        if count == 0 && settledCount == 0 && slots.count > 1024 {
            // Everything is free: give back the memory a past burst of waiters needed.
            // Generations are queue-wide, so stale ids still never match.
            slots = []
            freeList = -1
        }
    }

    @inlinable
    mutating func setNext(of index: Int, to next: Int) {
        guard case .queued(let payload, let continuation, let prev, _) = slots[index].phase else {
            preconditionFailure("WaiterQueue: link to a slot not in line")
        }
        slots[index].phase = .queued(payload, continuation, prev: prev, next: next)
    }

    @inlinable
    mutating func setPrev(of index: Int, to prev: Int) {
        guard case .queued(let payload, let continuation, _, let next) = slots[index].phase else {
            preconditionFailure("WaiterQueue: link to a slot not in line")
        }
        slots[index].phase = .queued(payload, continuation, prev: prev, next: next)
    }
}
