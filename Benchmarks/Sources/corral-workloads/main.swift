#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// corral-workloads NAME|all [--impl IMPL] [--n N]
//
// Prints one WORKLOADS.md line per implementation of each selected workload. Exits 1 when
// a check fails, 2 on bad arguments or an unknown workload.

let allWorkloads = primitiveWorkloads + groupWorkloads + poolWorkloads + streamWorkloads + batchWorkloads + taskWorkloads

func usage() -> Never {
    var names: [String] = []
    for workload in allWorkloads where !names.contains(workload.name) { names.append(workload.name) }
    printError("usage: corral-workloads NAME|all [--impl IMPL] [--n N]\nworkloads: \(names.joined(separator: " "))")
    exit(2)
}

func printError(_ message: String) {
    var text = message + "\n"
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
}

func printLine(_ line: String) {
    var text = line + "\n"
    text.withUTF8 { _ = write(1, $0.baseAddress, $0.count) }
}

func parseArguments() -> (name: String, impl: String?, n: Int?) {
    var arguments = Array(CommandLine.arguments.dropFirst())
    guard let name = arguments.first else { usage() }
    arguments.removeFirst()
    var impl: String?
    var n: Int?
    while !arguments.isEmpty {
        let flag = arguments.removeFirst()
        guard let value = arguments.first else { usage() }
        arguments.removeFirst()
        switch flag {
        case "--impl": impl = value
        case "--n":
            guard let count = Int(value), count > 0 else { printError("corral-workloads: bad N \(value)"); exit(2) }
            n = count
        default: usage()
        }
    }
    return (name, impl, n)
}

let (name, implFilter, nOverride) = parseArguments()

let selected = allWorkloads.filter { (name == "all" || $0.name == name) && (implFilter == nil || $0.impl == implFilter) }
if selected.isEmpty {
    printError("corral-workloads: unknown workload \(name)\(implFilter.map { " with impl \($0)" } ?? "")")
    usage()
}

let failed = await withTaskGroup(of: Bool.self) { group in
    // Run off the main actor, on the cooperative pool, as a server would.
    group.addTask {
        for workload in selected {
            let n = workload.n > 1 ? (nOverride ?? workload.n) : workload.n
            do {
                printLine(try await measure(workload, n: n))
            } catch {
                printError("corral-workloads: \(workload.name) impl=\(workload.impl): FAILED: \(error)")
                return true
            }
        }
        return false
    }
    return await group.next()!
}
exit(failed ? 1 : 0)
