/// Thrown at once when a request asks for more than a structure could ever grant: more
/// permits than an ``AsyncSemaphore`` has in all, more tokens than a ``RateLimiter``'s burst.
///
/// Waiting for such a request would hang forever; Corral fails it instead.
public struct CapacityError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What the request asked for (permits, tokens).
    public let requested: Int
    /// The most the structure can ever grant at once.
    public let capacity: Int
    /// The structure and operation that refused, e.g. `"AsyncSemaphore.acquire"`.
    public let operation: String

    /// Creates the error for `operation` asking `requested` of a structure holding `capacity`.
    public init(requested: Int, capacity: Int, operation: String) {
        self.requested = requested
        self.capacity = capacity
        self.operation = operation
    }

    /// A readable description naming the operation and both numbers.
    public var description: String {
        "CapacityError: \(operation) asked for \(requested) but at most \(capacity) can ever be granted at once"
    }
}
