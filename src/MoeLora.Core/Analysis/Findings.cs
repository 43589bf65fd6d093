using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Analysis;

/// <summary>A warning about what the configuration does to this model.</summary>
/// <param name="Code">Stable identifier (e.g. <c>experts_missed</c>) for scripts.</param>
public sealed record Finding(string Code, string Message);

/// <summary>A change worth making, with the exact LoraConfig and what it would train (planned, not guessed).</summary>
public sealed record Recommendation(string Title, string Detail, LoraConfig? Config = null, long? TrainableParameters = null);

/// <summary>Derives warnings and recommendations from an <see cref="AdapterPlan"/>; each one is computed, not canned.</summary>
public static class Findings
{
    public static IReadOnlyList<Finding> Warnings(AdapterPlan plan, IReadOnlyList<TargetBreakdown> rows)
    {
        var spec = plan.Spec;
        var list = new List<Finding>();
        if (spec.TransformersForwardFails is { } fails) list.Add(new("transformers_forward_fails", fails));
        if (spec.Unchecked is { } source)
            list.Add(new("tree_unchecked", $"{spec.ModelType}'s module tree {source}; it is not yet checked against what transformers " +
                $"{Reproduced.Transformers} builds, so names, shapes and the counts below may differ."));
        var byLoc = plan.Targets.GroupBy(t => t.Location).ToDictionary(g => g.Key, g => g.Count());
        var brokenForward = plan.Targets.Where(t => t.Kind == AdapterKind.Linear)
            .Select(t => spec.Tree.Find(t.ModuleName)).OfType<ModuleNode>()
            .Select(m => (m, Why: PeftModelTables.LoraForwardFails(m.ClassName))).Where(x => x.Why is not null).ToList();
        if (brokenForward.Count > 0)
            list.Add(new("peft_forward_fails",
                $"{brokenForward.Count} adapters sit on {brokenForward[0].m.ClassName} modules (e.g. {brokenForward[0].m.Name}): PEFT {plan.Version} " +
                $"creates and saves them, but the model's forward then fails ({brokenForward[0].Why}). Leave {brokenForward[0].m.Name.Split('.')[^1]} " +
                "out of target_modules (or exclude_modules it)."));

        if (spec.Moe.IsMoe && !byLoc.ContainsKey(ModuleLocation.RoutedExpert))
        {
            var missing = rows.Where(r => r.Adapters == 0).Select(r => r.Target).ToList();
            // Expert-style names that did match, but only the shared expert's (or dense layers') Linear modules.
            var elsewhere = rows.Where(r => r.Adapters > 0 && r.ByLocation.Keys.All(l => l is ModuleLocation.SharedExpert or ModuleLocation.Mlp))
                .ToList();
            var reasons = new List<string>();
            if (missing.Count > 0) reasons.Add($"{string.Join(", ", missing)} matched nothing");
            if (elsewhere.Count > 0)
                reasons.Add($"{string.Join(", ", elsewhere.Select(r => r.Target))} reach only the " +
                    string.Join(" and ", elsewhere.SelectMany(r => r.ByLocation.Keys).Distinct().Order().Select(l => l.Label())));
            var why = reasons.Count > 0 ? $" ({string.Join("; ", reasons)})" : "";
            list.Add(new("experts_missed",
                $"No adapter reaches the routed experts ({spec.Moe.NumExperts} experts in each of {spec.Moe.MoeLayers.Count} MoE layers){why}. " +
                $"Here they are {ExpertDescription(spec)}."));
        }
        if (byLoc.TryGetValue(ModuleLocation.Router, out var routers))
            list.Add(new("router_adapted", $"{routers} adapters sit on MoE routers: training them changes which experts tokens reach; circuit-breaker training normally keeps the router frozen."));
        var vision = byLoc.GetValueOrDefault(ModuleLocation.Vision) + byLoc.GetValueOrDefault(ModuleLocation.Projector);
        if (vision > 0)
            list.Add(new("vision_adapted", $"{vision} adapters sit in the vision tower or the multimodal projector (PEFT matches names, not towers)."));

        if (RegexScopeDropped(plan) is { Count: > 0 } outside)
            list.Add(new("regex_scope_dropped",
                $"PEFT {plan.Version} resolved the target_modules regex to the leaf names {string.Join(", ", TargetBreakdown.ResolvedLeafNames(plan))} " +
                $"before its transformers-5 rewrite, so the rest of the regex (layer numbers, module paths) is dropped: {outside.Count} adapted modules " +
                $"do not match it (e.g. {outside[0]})."));
        var dropped = DroppedByConversion(plan);
        if (dropped.Count > 0)
        {
            var parts = dropped.GroupBy(m => m.Location).Select(g => $"{g.Count()} {g.Key.Label()}");
            list.Add(new("conversion_dropped",
                $"PEFT's transformers-5 MoE rewrite moved {string.Join(", ", plan.Conversion!.Moved.Select(m => m.Key).Distinct())} to the fused experts, so {string.Join(" and ", parts)} modules with those names get no adapter."));
        }
        if (plan.Effective.LayersToTransform is { } ltt && ltt.Any(i => i >= spec.NumHiddenLayers || i < 0))
            list.Add(new("layer_out_of_range",
                $"layers_to_transform names layers {string.Join(", ", ltt.Where(i => i >= spec.NumHiddenLayers || i < 0))} but the model has layers 0..{spec.NumHiddenLayers - 1}; PEFT ignores them silently."));
        if (plan.Effective.LayersToTransform is not null && plan.Targets.Any(t => t.Kind == AdapterKind.Parameter))
            list.Add(new("layers_ignored_by_parameters", "layers_to_transform (and exclude_modules) do not apply to target_parameters: PEFT adapts those parameters in every layer."));
        if (plan.Targets.Any(t => t.Kind == AdapterKind.Parameter && t.Location == ModuleLocation.RoutedExpert && IsUnflaggedTransposed(spec, t)))
            list.Add(new("expert_orientation", "This model stores experts as (E, in, out) without transformers' is_transposed flag, so PEFT builds their LoRA with in and out swapped (lora_A sees the output width); the delta still has the parameter's shape."));
        if (plan.Targets.Any(t => t.TiedToEmbedding))
            list.Add(new("tied_adapter", "The LM head adapter is tied to the embedding adapter: same storage, but PEFT counts both in the trainable parameters."));
        foreach (var w in plan.PeftWarnings) list.Add(new("peft", w));
        foreach (var k in plan.Requested.IgnoredKeys) list.Add(new("ignored_key", $"LoraConfig key '{k}' is not modelled and was ignored."));
        return list;
    }

    /// <summary>
    /// A fused expert parameter stored (E, in, out) — its input width, the hidden size, sits in dimension 1 for
    /// gate_up_proj or its output width in dimension 2 for down_proj — on a module without transformers'
    /// is_transposed flag: PEFT then swaps in and out.
    /// </summary>
    private static bool IsUnflaggedTransposed(ModelSpec spec, AdapterTarget t)
    {
        if (t.BaseShape.Length != 3 || spec.Tree.Find(t.ModuleName) is not { IsTransposed: false }) return false;
        return t.ParameterName switch
        {
            "gate_up_proj" => t.BaseShape[1] == spec.HiddenSize && t.BaseShape[2] != spec.HiddenSize,
            "down_proj" => t.BaseShape[2] == spec.HiddenSize && t.BaseShape[1] != spec.HiddenSize,
            _ => false,
        };
    }

    /// <summary>How the routed experts appear in this layout.</summary>
    public static string ExpertDescription(ModelSpec spec)
    {
        var expertsModules = FirstExpertsGroup(spec);
        if (expertsModules.Count > 0)
        {
            var parameters = expertsModules.SelectMany(m => m.Parameters.Select(p => (Module: m, Param: p))).ToList();
            var kind = parameters.All(x => x.Param.Shape.Length == 3) ? "3-D parameters" : "stacked 2-D parameters (all experts' rows in one matrix)";
            return $"{kind} {string.Join(" and ", parameters.Select(x => $"{Relative(spec, x.Module.Name)}.{x.Param.LocalName} {x.Param.ShapeText}"))}, reachable only through target_parameters";
        }
        var linear = spec.Tree.Modules.FirstOrDefault(m => m.Location == ModuleLocation.RoutedExpert && m.Kind == ModuleKind.Linear);
        if (linear is not null)
        {
            var leaves = spec.Tree.Modules.Where(m => m.Location == ModuleLocation.RoutedExpert && m.Kind == ModuleKind.Linear)
                .Select(m => m.LeafName).Distinct();
            return $"per-expert nn.Linear modules named {string.Join(", ", leaves)} (e.g. {linear.Name})";
        }
        return "not adaptable";
    }

    /// <summary>The part of a module name after <c>layers.N.</c> (what suffix targets and target_parameters use).</summary>
    public static string Relative(ModelSpec spec, string name)
    {
        var marker = spec.DecoderLayersPath + ".";
        if (!name.StartsWith(marker, StringComparison.Ordinal)) return name;
        var rest = name[marker.Length..];
        var dot = rest.IndexOf('.');
        return dot < 0 ? rest : rest[(dot + 1)..];
    }

    /// <summary>
    /// Adapted modules the user's regex does not full-match: PEFT's transformers-5 rewrite turns a regex into the
    /// leaf names it hits, and those names then match in every layer (peft/tuners/lora/model.py, string targets).
    /// </summary>
    private static List<string> RegexScopeDropped(AdapterPlan plan)
    {
        if (plan.Conversion?.ResolvedFrom is null || plan.Requested.TargetModules?.Pattern is not { } pattern) return [];
        return plan.Targets.Select(t => t.ModuleName).Distinct(StringComparer.Ordinal)
            .Where(m => !PyRegex.FullMatch(pattern, m)).ToList();
    }

    /// <summary>Modules the requested names match by plain suffix rules that the final plan does not adapt.</summary>
    private static List<ModuleNode> DroppedByConversion(AdapterPlan plan)
    {
        if (plan.Conversion is null || plan.Requested.TargetModules?.Names is not { } names) return [];
        var movedNames = plan.Conversion.Moved.Select(m => m.Key).ToHashSet(StringComparer.Ordinal);
        // "." + name once, not once per module and name.
        var movedSuffixes = movedNames.Select(n => "." + n).ToArray();
        var adapted = plan.Targets.Select(t => t.ModuleName).ToHashSet(StringComparer.Ordinal);
        return plan.Spec.Tree.Modules
            .Where(m => m.Kind == ModuleKind.Linear && !adapted.Contains(m.Name)
                        && (movedNames.Contains(m.Name) || movedSuffixes.Any(suffix => m.Name.EndsWith(suffix, StringComparison.Ordinal)))
                        && m.Location is not ModuleLocation.Router)
            .ToList();
    }

    public static IReadOnlyList<Recommendation> Recommend(AdapterPlan plan, HiddenStatesMemory hidden, IReadOnlyList<Finding> warnings)
    {
        var spec = plan.Spec;
        var recs = new List<Recommendation>();
        var codes = warnings.Select(w => w.Code).ToHashSet(StringComparer.Ordinal);
        var requested = plan.Requested;

        if (codes.Contains("experts_missed") && ExpertTargetParameters(spec) is { Count: > 0 } tp)
        {
            // Keep every requested module target (they still reach attention, shared experts, dense MLPs).
            var cfg = requested with { TargetParameters = [.. requested.TargetParameters ?? [], .. tp] };
            Add(recs, plan, "Reach the routed experts",
                $"Add target_parameters=[{string.Join(", ", tp.Select(x => $"\"{x}\""))}]: PEFT wraps the fused expert tensors with a ParamWrapper, " +
                (spec.Tree.Modules.Any(m => m.Kind == ModuleKind.Experts && m.Parameters.Any(p => p.Shape.Length == 3))
                    ? "r per expert." : "one rank-r update per stacked matrix (shared by all experts)."), cfg);
        }
        else if (codes.Contains("experts_missed") && spec.Layout == Layout.V4)
        {
            var leaves = spec.Tree.Modules.Where(m => m.Location == ModuleLocation.RoutedExpert && m.Kind == ModuleKind.Linear)
                .Select(m => m.LeafName).Distinct().ToList();
            if (leaves.Count > 0)
            {
                var cfg = requested with { TargetModules = ModuleSelector.List([.. requested.TargetModules?.Names ?? [], .. leaves]) };
                Add(recs, plan, "Reach the routed experts", $"Add the per-expert module names {string.Join(", ", leaves)} to target_modules.", cfg);
            }
        }
        if (codes.Contains("router_adapted") && requested.TargetModules?.Names is { } names)
        {
            var routerLeaves = plan.Targets.Where(t => t.Location == ModuleLocation.Router).Select(t => t.ModuleName[(t.ModuleName.LastIndexOf('.') + 1)..]).ToHashSet();
            var cfg = requested with
            {
                TargetModules = ModuleSelector.List(names.Where(n => !routerLeaves.Contains(n[(n.LastIndexOf('.') + 1)..]))),
                TargetParameters = requested.TargetParameters?.Where(p => !p.EndsWith("gate.weight", StringComparison.Ordinal) && !p.StartsWith("router", StringComparison.Ordinal)).ToList(),
            };
            Add(recs, plan, "Keep the router frozen", "Drop the router names from the targets so routing stays as pretrained.", cfg);
        }
        if (codes.Contains("vision_adapted"))
        {
            var regex = "(" + string.Join("|", TowerRoots(spec).Select(r => r.Replace(".", @"\.", StringComparison.Ordinal))) + @")\..*";
            var cfg = requested with { ExcludeModules = ModuleSelector.Regex(regex) };
            Add(recs, plan, "Keep LoRA in the language model", $"Set exclude_modules to the regex {regex} (a list would only exclude the tower's root module).", cfg);
        }
        if (hidden.TargetLayers.Count > 0)
        {
            var maxTarget = hidden.TargetLayers.Max();
            if (requested.TargetModules?.Names is not null && requested.LayersToTransform is null && maxTarget + 1 < spec.NumHiddenLayers)
            {
                var layers = Enumerable.Range(0, maxTarget + 1).ToList();
                var cfg = requested with { LayersToTransform = layers };
                var note = plan.Targets.Any(t => t.Kind == AdapterKind.Parameter) ? " target_parameters still adapt every layer." : "";
                Add(recs, plan, "Adapt only the layers that feed the targets",
                    $"As the reference recipe does, set layers_to_transform=range({maxTarget + 1}) and truncate the model to {maxTarget + 1} blocks.{note}", cfg);
            }
            recs.Add(new Recommendation("Keep only the target hidden states",
                $"Stack hidden_states[{string.Join(", ", hidden.TargetLayers)}] instead of all {hidden.NumStates}: {Units.Bytes(hidden.TargetLayersBytes)} instead of {Units.Bytes(hidden.AllLayersBytes)} per batch ({hidden.SavingPercent:F1}% less)."));
        }
        var expertParams = plan.Targets.Where(t => t.Location == ModuleLocation.RoutedExpert).Sum(t => t.NumParameters);
        if (spec.Moe.IsMoe && expertParams > 0 && expertParams * 2 > plan.LoraParameters && spec.Moe.NumExperts > 1)
        {
            var slices = plan.Targets.Where(t => t.Kind == AdapterKind.Parameter && t.Location == ModuleLocation.RoutedExpert)
                .Select(t => t.ParameterName!).Distinct().ToList();
            if (slices.Count > 0)
            {
                var rank = Math.Max(1, plan.Effective.R / (int)spec.Moe.NumExperts);
                var cfg = requested with { RankPattern = [.. slices.Select(s => new KeyValuePair<string, int>($"experts.{s}", rank)), .. requested.RankPattern] };
                Add(recs, plan, "Budget the expert rank",
                    $"Expert adapters hold {100.0 * expertParams / plan.LoraParameters:F0}% of the LoRA parameters; PEFT's docs suggest rank_pattern r // num_experts = {rank} for experts.", cfg);
            }
        }
        if (spec.Moe.IsMoe)
        {
            recs.Add(new Recommendation("Log router decisions",
                "Compare expert selection on harmful vs benign prompts (moelora routers): only the experts the router selects receive gradient, so rerouting is learned where tokens actually go."));
            recs.Add(new Recommendation("Start with a frozen router",
                "Train expert and attention adapters first; adapting the router changes the routing that the circuit-breaker loss is measured against."));
        }
        return recs;
    }

    /// <summary>
    /// The experts modules of the first layer that has any, preferring routed experts: one fused module, or several
    /// that hold one weight each (JetMoE's and 4.57 Granite's input_linear / output_linear).
    /// </summary>
    private static List<ModuleNode> FirstExpertsGroup(ModelSpec spec)
    {
        var first = spec.Tree.Modules.FirstOrDefault(m => m.Kind == ModuleKind.Experts && m.Location == ModuleLocation.RoutedExpert)
            ?? spec.Tree.Modules.FirstOrDefault(m => m.Kind == ModuleKind.Experts);
        return first is null ? []
            : spec.Tree.Modules.Where(m => m.Kind == ModuleKind.Experts && m.LayerIndex == first.LayerIndex && m.Location == first.Location).ToList();
    }

    /// <summary>The exact target_parameters entries that reach this model's routed experts.</summary>
    public static IReadOnlyList<string> ExpertTargetParameters(ModelSpec spec)
    {
        // 3-D fused experts, or DBRX's 2-D stacked ones; biases (gpt-oss *_proj_bias) are not weights to adapt.
        return FirstExpertsGroup(spec).SelectMany(m => m.Parameters
                .Where(p => p.Shape.Length >= 2 && !p.LocalName.EndsWith("bias", StringComparison.Ordinal))
                .Select(p => $"{Relative(spec, m.Name)}.{p.LocalName}"))
            .ToList();
    }

    /// <summary>The outermost vision-tower and projector modules (e.g. <c>vision_model</c>, <c>model.multi_modal_projector</c>).</summary>
    private static IEnumerable<string> TowerRoots(ModelSpec spec)
    {
        static bool IsTower(ModuleNode? m) => m?.Location is ModuleLocation.Vision or ModuleLocation.Projector;
        return spec.Tree.Modules.Where(m => IsTower(m) && !IsTower(spec.Tree.Find(m.Name.Contains('.') ? m.Name[..m.Name.LastIndexOf('.')] : "")))
            .Select(m => m.Name);
    }

    private static bool SameTargets(AdapterPlan a, AdapterPlan b) =>
        a.Targets.Select(t => (t.Name, t.R, t.Alpha)).ToHashSet().SetEquals(b.Targets.Select(t => (t.Name, t.R, t.Alpha)));

    private static void Add(List<Recommendation> recs, AdapterPlan plan, string title, string detail, LoraConfig cfg)
    {
        try
        {
            var suggested = AdapterPlanner.Plan(plan.Spec, cfg, plan.Version);
            // Re-planned, a suggestion that adapts exactly what the current config adapts changes nothing
            // (e.g. layers_to_transform when only target_parameters are set): it is not shown.
            if (suggested.TrainableParameters == plan.TrainableParameters && SameTargets(suggested, plan)) return;
            recs.Add(new Recommendation(title, detail, cfg, suggested.TrainableParameters));
        }
        catch (PeftConfigException)
        {
            // A suggestion PEFT would reject is no suggestion.
        }
    }
}
