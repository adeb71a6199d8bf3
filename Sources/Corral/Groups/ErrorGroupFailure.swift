/// Thrown by an error group run with ``ErrorGroupPolicy/collectAll`` when tasks failed:
/// every error, in the order the tasks threw them.
public struct ErrorGroupFailure: Error, CustomStringConvertible {
    /// The errors the group's tasks threw, first thrown first. Never empty.
    public let errors: [any Error]
    /// The error the group's body threw, if it threw too.
    public let bodyError: (any Error)?

    /// Creates a failure holding `errors` (and the body's own error, if any).
    public init(errors: [any Error], bodyError: (any Error)? = nil) {
        self.errors = errors
        self.bodyError = bodyError
    }

    /// The number of failures and the first few errors.
    public var description: String {
        let shown = errors.prefix(3).map { "\($0)" }.joined(separator: "; ")
        let more = errors.count > 3 ? "; …" : ""
        let body = bodyError.map { " (and the body threw: \($0))" } ?? ""
        return "ErrorGroupFailure: \(errors.count) task\(errors.count == 1 ? "" : "s") failed: \(shown)\(more)\(body)"
    }
}
