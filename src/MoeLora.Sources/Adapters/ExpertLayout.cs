using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Core;
using MoeLora.Core.Architectures;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Sources.Adapters;

/// <summary>How a fused <c>gate_up_proj</c> orders its gate and up features.</summary>
public enum GateUpOrder
{
    /// <summary>Gate features first, then up (<c>cat(gate, up)</c>): every transformers-5 family except gpt-oss.</summary>
    Halves,

    /// <summary>Gate and up alternate (gate = features 0::2, up = 1::2): gpt-oss' <c>GptOssExperts</c>.</summary>
    Interleaved,
}

/// <summary>One of the three projections of a gated expert MLP.</summary>
public enum ExpertRole { Gate, Up, Down }

/// <summary>
/// What converting expert LoRA needs to know about the adapter's model: how gate and up share <c>gate_up_proj</c>,
/// and the per-expert module names of its checkpoint (the transformers-4 names, e.g. Mixtral's
/// <c>block_sparse_moe.experts.3.w1</c>), which are the names PEFT &lt;= 0.18 saved and vLLM's 2-D loader reads. Both
/// come from Core (the runtime's experts layout and <see cref="CheckpointLayout"/>), never from a model's name.
/// Models whose checkpoints store the experts fused (gpt-oss, Llama 4) have no per-expert names; they get
/// <c>…experts.{e}.{gate,up,down}_proj</c>.
/// </summary>
public sealed partial class ExpertLayout
{
    // Templates with "{L}" for the layer index and "{E}" for the expert: fused owner → per-expert module per role.
    private readonly Dictionary<string, string[]> _perExpert;

    // Owner templates whose fused parameters PEFT reads transposed (see PeftDeltaTransposed).
    private readonly IReadOnlySet<string> _deltaTransposed;

    private ExpertLayout(GateUpOrder order, string source, Dictionary<string, string[]> perExpert, IReadOnlySet<string> storedFused,
        IReadOnlySet<string> deltaTransposed, string? modelType = null)
    {
        ModelType = modelType;
        Order = order;
        Source = source;
        _perExpert = perExpert;
        StoredFusedOwners = storedFused;
        _deltaTransposed = deltaTransposed;
    }

    public GateUpOrder Order { get; }

    /// <summary>The model type the layout was read from (null when only generic names are known).</summary>
    public string? ModelType { get; }

    /// <summary>
    /// Whether PEFT ≥ 0.19 reads this model's per-expert (transformers-4) adapters: only when transformers 5 fuses its
    /// experts and PEFT's MoE conversion table has a rule for the type. qwen2_moe, phimoe, granitemoe and others fuse
    /// without a rule, so PEFT (0.21 checked on the device) reports their per-expert keys as unexpected and the fused
    /// experts stay without LoRA. Null when the model type is unknown.
    /// </summary>
    public bool? PeftConvertsPerExpert => ModelType is null ? null : PeftModelTables.ReadsPerExpertAdapters(ModelType);

    /// <summary>Where the knowledge came from, for messages (e.g. "--model …", "adapter_config.json auto_mapping (gpt_oss)").</summary>
    public string Source { get; }

    /// <summary>Templates of fused expert owners whose checkpoint stores them fused (no per-expert form exists).</summary>
    public IReadOnlySet<string> StoredFusedOwners { get; }

    /// <summary>Generic names, for an adapter whose model is known only by the caller (tests, synthetic adapters).</summary>
    public static ExpertLayout Generic(GateUpOrder order, string source = "assumed") =>
        new(order, source, new Dictionary<string, string[]>(StringComparer.Ordinal), new HashSet<string>(StringComparer.Ordinal),
            new HashSet<string>(StringComparer.Ordinal));

    /// <summary>From a built transformers-5 model.</summary>
    public static ExpertLayout FromSpec(ModelSpec spec, string source)
    {
        // Only gpt-oss' experts interleave gate and up; the runtime settings say which layout a model's experts use.
        var layouts = spec.Runtime?.Layers.Select(l => l.FeedForward).OfType<MoeSettings>().Select(m => m.Experts.Layout).ToHashSet() ?? [];
        bool interleaved = layouts.Contains(ExpertsLayout.GptOssInterleaved);
        // Experts stored (E, in, out) for x @ W: PEFT 0.19.1+ reads a 3-D parameter as (E, out, in) unless its owner
        // says is_transposed (gpt-oss does, Llama 4 does not), so for Llama 4 its ΔW_e is the transpose of the
        // projection's (out, in) weight: gate/up features are ΔW_e's columns.
        bool inOut = layouts.Overlaps([ExpertsLayout.Llama4InOut, ExpertsLayout.GptOssInterleaved, ExpertsLayout.GroupedGemmInOut]);
        var perExpert = new Dictionary<string, string[]>(StringComparer.Ordinal);
        var storedFused = new HashSet<string>(StringComparer.Ordinal);
        var deltaTransposed = new HashSet<string>(StringComparer.Ordinal);
        var checkpoint = spec.Layout == Layout.V5 ? CheckpointLayout.For(spec) : null;
        foreach (var owner in spec.Tree.Modules.Where(m => m.Kind == ModuleKind.Experts))
        {
            string template = Template(owner.Name);
            var gateUp = owner.Parameter("gate_up_proj");
            var down = owner.Parameter("down_proj");
            if (gateUp is null || down is null) continue;
            if (inOut && !owner.IsTransposed) deltaTransposed.Add(template);
            var gu = checkpoint?.For(gateUp.Name);
            var dn = checkpoint?.For(down.Name);
            if (gu is { IsStack: true } && dn is { IsStack: true } && gu.Parts.Count == 2 * dn.Parts.Count)
            {
                // Parts are expert by expert, gate before up; expert 0's names make the template.
                static string Part(ParameterNode p) => ExpertIndex().Replace(Template(p.Name[..p.Name.LastIndexOf('.')]), ".experts.{E}.", 1);
                perExpert.TryAdd(template, [Part(gu.Parts[0]), Part(gu.Parts[1]), Part(dn.Parts[0])]);
            }
            else storedFused.Add(template);
        }
        return new ExpertLayout(interleaved ? GateUpOrder.Interleaved : GateUpOrder.Halves, source, perExpert, storedFused, deltaTransposed, spec.ModelType);
    }

    /// <summary>
    /// From the adapter's own config: PEFT records the base model's module (<c>auto_mapping.parent_library</c>, e.g.
    /// <c>transformers.models.gpt_oss.modeling_gpt_oss</c>) when it saves a model without a task type. Null when the
    /// config does not say, or names a model type Core does not build.
    /// </summary>
    public static ExpertLayout? FromAdapterConfig(JsonObject config)
    {
        if (config["auto_mapping"] is not JsonObject mapping || mapping["parent_library"] is not JsonValue lib || lib.GetValueKind() != System.Text.Json.JsonValueKind.String)
            return null;
        var m = ParentLibrary().Match(lib.GetValue<string>());
        if (!m.Success || !ArchitectureRegistry.IsSupported(m.Groups[1].Value)) return null;
        string type = m.Groups[1].Value;
        try
        {
            // The layout does not depend on sizes, so the family's defaults are enough.
            var spec = ArchitectureRegistry.Build(new ModelConfig(new JsonObject { ["model_type"] = type }), Layout.V5);
            return FromSpec(spec, $"adapter_config.json auto_mapping ({type})");
        }
        catch (ConfigException)
        {
            return null;
        }
    }

    /// <summary>The per-expert module that holds <paramref name="role"/> of <paramref name="expert"/> of a fused owner.</summary>
    public string ExpertModule(string owner, int expert, ExpertRole role)
    {
        var (template, layer, prefix) = Split(owner);
        if (_perExpert.TryGetValue(template, out var names))
            return prefix + Fill(names[(int)role], layer, expert);
        return $"{owner}.{expert}.{role.ToString().ToLowerInvariant()}_proj";
    }

    /// <summary>The fused owner, expert and role of a per-expert module, or null when it is not one.</summary>
    public (string Owner, int Expert, ExpertRole Role)? Locate(string module)
    {
        var (template, layer, prefix) = Split(module);
        var e = ExpertIndex().Match(template);
        if (e.Success)
        {
            string withE = template[..e.Index] + ".experts.{E}." + template[(e.Index + e.Length)..];
            int expert = int.Parse(e.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
            foreach (var (owner, names) in _perExpert)
                for (int r = 0; r < 3; r++)
                    if (names[r] == withE) return (prefix + Fill(owner, layer, 0), expert, (ExpertRole)r);
        }
        var g = GenericExpert().Match(module);
        if (!g.Success) return null;
        ExpertRole? role = g.Groups[3].Value switch
        {
            "gate_proj" or "w1" => ExpertRole.Gate,
            "up_proj" or "w3" => ExpertRole.Up,
            "down_proj" or "w2" => ExpertRole.Down,
            _ => null,
        };
        return role is null ? null : (g.Groups[1].Value, int.Parse(g.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture), role.Value);
    }

    /// <summary>
    /// True when PEFT's ΔW_e of this owner's fused parameters is the transpose of each projection's (out, in) weight
    /// (its lora_A reads the projection's output features): Llama 4's (E, in, out) experts without is_transposed.
    /// </summary>
    public bool PeftDeltaTransposed(string owner) => _deltaTransposed.Contains(Split(owner).Template);

    /// <summary>True when the model's checkpoint stores this owner's experts fused (no per-expert form exists).</summary>
    public bool IsStoredFused(string owner) => StoredFusedOwners.Contains(Split(owner).Template);

    private static string Template(string name) => Split(name).Template;

    // A module name as (template from "layers.{L}." on, layer index, what precedes "layers."), so the text tower of a
    // multimodal model (model.language_model.layers…) and a text-only build (model.layers…) share templates.
    private static (string Template, string? Layer, string Prefix) Split(string name)
    {
        var m = LayerIndex().Match(name);
        if (!m.Success) return (name, null, "");
        return ("layers.{L}." + name[(m.Index + m.Length)..], m.Groups[1].Value, name[..(m.Index + 1)]);
    }

    private static string Fill(string template, string? layer, int expert) =>
        template.Replace("{L}", layer ?? "{L}", StringComparison.Ordinal).Replace("{E}", expert.ToString(System.Globalization.CultureInfo.InvariantCulture), StringComparison.Ordinal);

    [GeneratedRegex(@"\.layers\.(\d+)\.")]
    private static partial Regex LayerIndex();

    [GeneratedRegex(@"\.experts\.(\d+)\.")]
    private static partial Regex ExpertIndex();

    [GeneratedRegex(@"^(.+\.experts)\.(\d+)\.([A-Za-z0-9_]+)$")]
    private static partial Regex GenericExpert();

    [GeneratedRegex(@"^transformers\.models\.([a-z0-9_]+)\.modeling_")]
    private static partial Regex ParentLibrary();
}
