using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Analysis;

/// <summary>How one runtime parameter compares with the checkpoint.</summary>
public enum ParameterCheckStatus
{
    /// <summary>Stored with the expected shape, under its own name or as the tensors transformers converts.</summary>
    Match,
    /// <summary>Stored, but a shape disagrees with the analysis.</summary>
    ShapeMismatch,
    /// <summary>Not stored (or only some of its per-expert parts are).</summary>
    Missing,
    /// <summary>A tied weight: shares storage with another parameter, so checkpoints omit it.</summary>
    Tied,
}

/// <summary>One runtime parameter checked against the checkpoint.</summary>
/// <param name="Name">Runtime name, as <c>named_parameters()</c> gives it in the analysed layout.</param>
/// <param name="StoredAs">The checkpoint tensors that hold it (one, or the per-expert tensors of a fused parameter).</param>
/// <param name="Detail">For problems: what disagrees, in one sentence.</param>
public sealed record ParameterCheck(string Name, IReadOnlyList<long> Shape, ParameterCheckStatus Status, IReadOnlyList<string> StoredAs, string? Detail);

/// <summary>The analysis checked against a checkpoint's headers, plus what the checkpoint really stores.</summary>
/// <param name="Parameters">Every runtime parameter, in <c>named_parameters()</c> order (tied weights included).</param>
/// <param name="NotParameters">Tensors stored on modules the analysis knows but that are no parameter of it: persistent
/// buffers such as a router's score-correction bias.</param>
/// <param name="Unexpected">Tensors that belong to no module of the analysed model.</param>
/// <param name="Dtypes">Elements and bytes per stored dtype.</param>
/// <param name="SizeOnDisk">Bytes of all checkpoint files, headers included.</param>
public sealed record CrossCheckReport(
    IReadOnlyList<ParameterCheck> Parameters,
    IReadOnlyList<CheckpointTensor> NotParameters,
    IReadOnlyList<CheckpointTensor> Unexpected,
    IReadOnlyList<DtypeTotal> Dtypes,
    long SizeOnDisk,
    long DataSize,
    int FileCount)
{
    /// <summary>Parameters whose shape or presence disagrees.</summary>
    public IReadOnlyList<ParameterCheck> Problems => Parameters.Where(p => p.Status is ParameterCheckStatus.ShapeMismatch or ParameterCheckStatus.Missing).ToList();

    /// <summary>True when every parameter is stored as expected and nothing unknown is stored.</summary>
    public bool IsClean => Problems.Count == 0 && Unexpected.Count == 0;

    /// <summary>The runtime parameter each checkpoint tensor feeds (per-expert tensors map to their fused parameter).</summary>
    public IReadOnlyDictionary<string, string> RuntimeNameOf =>
        Parameters.Where(p => p.Status != ParameterCheckStatus.Tied)
            .SelectMany(p => p.StoredAs.Select(s => (Stored: s, Runtime: p.Name)))
            .GroupBy(x => x.Stored, StringComparer.Ordinal)
            .ToDictionary(g => g.Key, g => g.First().Runtime, StringComparer.Ordinal);
}

/// <summary>
/// Checks an analysed model (Core's module tree) against a checkpoint's safetensors headers. Checkpoint names may
/// follow either transformers layout: the analysed one, or the other one (legacy per-expert tensors that
/// transformers 5 fuses on load, or fused tensors when the analysis uses the v4 layout).
/// </summary>
public static class CheckpointCrossCheck
{
    public static CrossCheckReport Run(ModelSpec spec, Checkpoint checkpoint)
    {
        ModuleTree runtime = spec.Tree;
        CheckpointLayout? correspondence = CheckpointLayout.For(spec);

        var consumed = new HashSet<string>(StringComparer.Ordinal);
        var checks = new List<ParameterCheck>();
        foreach (ParameterNode parameter in runtime.Modules.SelectMany(m => m.Parameters))
            checks.Add(Check(parameter, checkpoint, correspondence, consumed));

        var leftovers = checkpoint.Tensors.Where(t => !consumed.Contains(t.Name)).ToList();
        var notParameters = leftovers.Where(t => runtime.Find(OwnerName(t.Name)) is not null).ToList();
        var unexpected = leftovers.Except(notParameters).ToList();
        return new CrossCheckReport(checks, notParameters, unexpected, checkpoint.DtypeTotals, checkpoint.SizeOnDisk, checkpoint.DataSize, checkpoint.Files.Count);
    }

    private static ParameterCheck Check(ParameterNode parameter, Checkpoint checkpoint, CheckpointLayout? correspondence, HashSet<string> consumed)
    {
        if (checkpoint.Find(parameter.Name) is { } direct)
        {
            consumed.Add(direct.Name);
            return direct.Tensor.Shape.SequenceEqual(parameter.Shape)
                ? new ParameterCheck(parameter.Name, parameter.Shape, ParameterCheckStatus.Match, [direct.Name], null)
                : new ParameterCheck(parameter.Name, parameter.Shape, ParameterCheckStatus.ShapeMismatch, [direct.Name],
                    $"the checkpoint stores {Shape(direct.Tensor.Shape)}, the analysis expects {Shape(parameter.Shape)}");
        }

        if (correspondence?.For(parameter.Name) is { } alternative)
        {
            var present = alternative.Parts.Where(p => checkpoint.Find(p.Name) is not null).ToList();
            if (present.Count > 0)
            {
                foreach (ParameterNode part in present) consumed.Add(part.Name);
                var names = alternative.Parts.Select(p => p.Name).ToList();
                if (present.Count < alternative.Parts.Count)
                {
                    var missing = alternative.Parts.Except(present).ToList();
                    return new ParameterCheck(parameter.Name, parameter.Shape, ParameterCheckStatus.Missing, names,
                        $"{missing.Count} of its {alternative.Parts.Count} stored tensors are absent, e.g. {missing[0].Name}");
                }
                ParameterNode? wrong = alternative.Parts.FirstOrDefault(p => !checkpoint.Find(p.Name)!.Tensor.Shape.SequenceEqual(p.Shape));
                return wrong is null
                    ? new ParameterCheck(parameter.Name, parameter.Shape, ParameterCheckStatus.Match, names, null)
                    : new ParameterCheck(parameter.Name, parameter.Shape, ParameterCheckStatus.ShapeMismatch, names,
                        $"{wrong.Name} is stored as {Shape(checkpoint.Find(wrong.Name)!.Tensor.Shape)}, the analysis expects {Shape(wrong.Shape)}");
            }
        }

        return parameter.IsTied
            ? new ParameterCheck(parameter.Name, parameter.Shape, ParameterCheckStatus.Tied, [], $"tied to {parameter.TiedTo}")
            : new ParameterCheck(parameter.Name, parameter.Shape, ParameterCheckStatus.Missing, [], "the checkpoint does not store it");
    }

    private static string OwnerName(string name) => name.Contains('.', StringComparison.Ordinal) ? name[..name.LastIndexOf('.')] : "";

    private static string Shape(IReadOnlyList<long> shape) => "[" + string.Join(", ", shape) + "]";
}
