/// Thrown when a ``WorkerPool`` refuses a job, or drops a job it accepted at an immediate
/// shutdown, before it started.
///
/// Distinct from a job's own error: ``JobHandle/value`` throws the job's error when the job
/// ran and failed, and `PoolError` when the pool never ran it.
public struct PoolError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable {
            case queueFull
            case shutdown
        }
        fileprivate let base: Base

        /// ``WorkerPool/trySubmit(_:)``: the queue is full (the job was not accepted).
        public static var queueFull: Code { Code(base: .queueFull) }
        /// The pool is shut down: a submission after (or waiting during) shutdown was refused,
        /// or an accepted job was dropped from the queue by an immediate shutdown.
        public static var shutdown: Code { Code(base: .shutdown) }

        /// The code's name.
        public var description: String {
            switch base {
            case .queueFull: "queueFull"
            case .shutdown: "shutdown"
            }
        }
    }

    /// What went wrong.
    public let code: Code
    /// The pool's name.
    public let poolName: String

    /// The queue of pool `name` is full.
    public static func queueFull(pool name: String) -> PoolError {
        PoolError(code: .queueFull, poolName: name)
    }

    /// Pool `name` is shut down.
    public static func shutdown(pool name: String) -> PoolError {
        PoolError(code: .shutdown, poolName: name)
    }

    /// A readable description naming the pool.
    public var description: String {
        switch code.base {
        case .queueFull: "PoolError.queueFull: the queue of WorkerPool \"\(poolName)\" is full; the job was not accepted"
        case .shutdown: "PoolError.shutdown: WorkerPool \"\(poolName)\" is shut down; the job was not run"
        }
    }
}
