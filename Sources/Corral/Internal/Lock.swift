#if canImport(Darwin)
import Darwin
#elseif canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#else
#error("Corral's lock needs Darwin, Glibc or Musl")
#endif

#if canImport(Darwin)
@usableFromInline typealias PlatformLock = os_unfair_lock
#else
@usableFromInline typealias PlatformLock = pthread_mutex_t
#endif

/// A value of type `State` guarded by a platform lock, in one allocation.
///
/// Corral's only lock type (see DESIGN.md, "How the hot paths are built"): an
/// uncontended `pthread_mutex_t` costs a third of `Synchronization.Mutex` on Linux, and
/// ThreadSanitizer understands it, where it reports false races on `Mutex`'s futex path.
/// On glibc it is an adaptive mutex (spins a little before it sleeps).
///
/// Rules for callers: keep the critical section short and free of `await`; never resume a
/// continuation, call user code or cancel a task while holding the lock — return an
/// action from `withLock` and perform it afterwards.
@usableFromInline
package struct LockedState<State>: @unchecked Sendable {
    // @unchecked Sendable: `State` is only reached through `withLock`, which holds the
    // platform lock stored in the same buffer for the whole access.
    @usableFromInline
    final class Buffer: ManagedBuffer<State, PlatformLock> {
        deinit {
            #if !canImport(Darwin)
            withUnsafeMutablePointerToElements { lock in
                _ = pthread_mutex_destroy(lock)
            }
            #endif
        }
    }

    @usableFromInline let buffer: ManagedBuffer<State, PlatformLock>

    @inlinable
    package init(_ initial: State) {
        buffer = Buffer.create(minimumCapacity: 1) { buffer in
            buffer.withUnsafeMutablePointerToElements { lock in
                #if canImport(Darwin)
                lock.initialize(to: os_unfair_lock())
                #else
                lock.initialize(to: pthread_mutex_t())
                var attributes = pthread_mutexattr_t()
                pthread_mutexattr_init(&attributes)
                #if canImport(Glibc)
                // Spin briefly before sleeping in the kernel: Corral's critical sections are a
                // few dozen instructions, so a contended lock is usually free again sooner than
                // a futex sleep and wake-up take. Measured here (ns per op, plain -> adaptive,
                // 3 runs each, medians): sem.weighted_mix 1,243 -> 983, pipeline.3stage
                // 562 -> 452, chan.spsc 168 -> 133, pool.throughput 1,046 -> 979,
                // batch.throughput 458 -> 446; but chan.mpmc 178 -> 236 (4 x 4 tasks on one
                // channel spin against each other on 2 cores).
                pthread_mutexattr_settype(&attributes, Int32(PTHREAD_MUTEX_ADAPTIVE_NP))
                #endif
                let status = pthread_mutex_init(lock, &attributes)
                pthread_mutexattr_destroy(&attributes)
                precondition(status == 0, "pthread_mutex_init failed with \(status)")
                #endif
            }
            return initial
        }
    }

    /// Runs `body` with exclusive access to the state.
    @inlinable
    @inline(__always)
    package func withLock<Result, Failure: Error>(
        _ body: (inout State) throws(Failure) -> Result
    ) throws(Failure) -> Result {
        try buffer.withUnsafeMutablePointers { (state, lock) throws(Failure) -> Result in
            #if canImport(Darwin)
            os_unfair_lock_lock(lock)
            defer { os_unfair_lock_unlock(lock) }
            #else
            pthread_mutex_lock(lock)
            defer { pthread_mutex_unlock(lock) }
            #endif
            return try body(&state.pointee)
        }
    }
}

extension LockedState {
    /// Suspends the current task as waiter `id` until it is settled, and returns its outcome.
    ///
    /// The waiter must have been enqueued (in the critical section of the failed fast path)
    /// before this is called; `install` hands its continuation to the state machine, which
    /// returns a resumption when the waiter was settled in between. `cancel` runs when the
    /// task is cancelled (possibly before `install`, possibly after the waiter was served:
    /// the state machine decides) and returns the continuations to resume.
    ///
    /// Continuations are resumed after the lock is released.
    @inlinable
    nonisolated(nonsending)
    func suspend<Outcome: Sendable>(
        install: (inout State, UnsafeContinuation<Outcome, Never>) -> Resumption<Outcome>?,
        onCancel cancel: @Sendable (inout State) -> Resumptions<Outcome>
    ) async -> Outcome {
        await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Outcome, Never>) in
                withLock { install(&$0, continuation) }?.resume()
            }
        } onCancel: {
            withLock { cancel(&$0) }.resumeAll()
        }
    }
}
