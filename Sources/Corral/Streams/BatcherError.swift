/// Thrown to a ``Batcher``'s caller whose item was not handled: the batcher was shut down
/// before the item was accepted, or the handler broke its contract.
///
/// Distinct from the handler's own error, which reaches the callers of the failed batch
/// unchanged.
public struct BatcherError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What went wrong.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: Hashable, Sendable {
            case shutdown
            case outputCountMismatch
        }
        fileprivate let base: Base

        /// The batcher is shut down: the item was not accepted.
        public static var shutdown: Code { Code(base: .shutdown) }
        /// The handler returned a different number of outputs than it was given items: every
        /// caller of that batch gets this error, since no output can be matched to its item.
        public static var outputCountMismatch: Code { Code(base: .outputCountMismatch) }

        /// The code's name.
        public var description: String {
            switch base {
            case .shutdown: "shutdown"
            case .outputCountMismatch: "outputCountMismatch"
            }
        }
    }

    /// What went wrong.
    public let code: Code
    /// The batcher's name.
    public let batcherName: String
    /// For ``Code/outputCountMismatch``: the items handed to the handler.
    public let expectedOutputs: Int?
    /// For ``Code/outputCountMismatch``: the outputs the handler returned.
    public let actualOutputs: Int?

    /// Batcher `name` is shut down.
    public static func shutdown(batcher name: String) -> BatcherError {
        BatcherError(code: .shutdown, batcherName: name, expectedOutputs: nil, actualOutputs: nil)
    }

    /// The handler of batcher `name` returned `actual` outputs for `expected` items.
    public static func outputCountMismatch(batcher name: String, expected: Int, actual: Int) -> BatcherError {
        BatcherError(code: .outputCountMismatch, batcherName: name, expectedOutputs: expected, actualOutputs: actual)
    }

    /// A readable description naming the batcher.
    public var description: String {
        switch code.base {
        case .shutdown:
            "BatcherError.shutdown: Batcher \"\(batcherName)\" is shut down; the item was not accepted"
        case .outputCountMismatch:
            "BatcherError.outputCountMismatch: the handler of Batcher \"\(batcherName)\" returned "
                + "\(actualOutputs ?? 0) outputs for \(expectedOutputs ?? 0) items; it must return one output per item, in order"
        }
    }
}
