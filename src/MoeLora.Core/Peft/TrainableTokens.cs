using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Peft;

/// <summary>
/// <c>trainable_token_indices</c> (set_additional_trainable_modules, after modules_to_save): each targeted embedding
/// is wrapped in a TrainableTokensWrapper whose <c>token_adapter.trainable_tokens_delta</c> (tokens × dim) trains and
/// is saved; the original rows are a buffer. With tied embeddings the LM head gets a wrapper sharing the same delta,
/// which adds no parameter and saves nothing of its own.
/// </summary>
internal static class TrainableTokens
{
    private const string Prefix = "base_model.model.";
    private const string Reason = "trainable_token_indices";

    public static void Add(ModelSpec spec, LoraConfig cfg, IReadOnlyList<AdapterTarget> targets, List<TrainableExtra> extras, List<string> warnings)
    {
        if (cfg.TrainableTokenIndices is not { } layers) return;
        var tree = spec.Tree;
        // The list form targets the model's input embedding by its full name (_get_input_embeddings_name).
        var resolved = layers.Select(kv => (Name: kv.Key ?? spec.InputEmbeddings, Indices: kv.Value)).ToList();
        foreach (var (name, _) in resolved.Where(l => cfg.ModulesToSave?.Contains(l.Name) == true))
            throw new PeftInjectionException("ValueError",
                $"The embedding layer is already marked to be trained fully, either specify `modules_to_save=[..., \"{name}\", ...]` or `trainable_tokens={{'{name}': x}}` but not both.");
        if (resolved.Count > 1 && spec.TieWordEmbeddings)
            throw Refuse("several layers with tied embeddings (PEFT compares their indices to decide which layers share one delta)");

        foreach (var (name, indices) in resolved)
        {
            // _set_trainable(strict_module_check=True): plain endswith on every module name, no dot boundary.
            var matched = tree.Modules.Where(m => m.Name.Length > 0 && m.Name.EndsWith(name, StringComparison.Ordinal)).ToList();
            if (matched.Count == 0)
                throw new PeftInjectionException("ValueError", $"Target modules {{'{name}'}} not found in the base model. Please check the target modules and try again.");
            foreach (var module in matched)
            {
                if (module.Kind != ModuleKind.Embedding)
                    throw Refuse($"'{module.Name}' is a {module.ClassName}, not an nn.Embedding");
                if (targets.Any(t => t.ModuleName == module.Name))
                    throw Refuse($"'{module.Name}' also carries a LoRA adapter from target_modules");
                if (cfg.ModulesToSave?.Any(e => module.Name.EndsWith(e, StringComparison.Ordinal)) == true)
                    throw Refuse($"'{module.Name}' is also copied by modules_to_save");
                var weight = module.Parameter("weight")!;
                long rows = weight.Shape[0], dim = weight.Shape[1];
                if (indices.FirstOrDefault(i => i >= rows || i < -rows, int.MinValue) is var bad && bad != int.MinValue)
                    throw new PeftConfigException($"trainable_token_indices: token {bad} is out of range for '{module.Name}' ({rows} embeddings)");
                extras.Add(new TrainableExtra($"{Prefix}{module.Name}.token_adapter.trainable_tokens_delta.default",
                    $"{Prefix}{module.Name}.token_adapter.trainable_tokens_delta", [indices.Count, dim], Reason, CountsInTotal: true));
            }
        }

        if (spec.TieWordEmbeddings && resolved.Any(l => spec.InputEmbeddings.EndsWith(l.Name, StringComparison.Ordinal)))
        {
            // The tied LM head is wrapped too and shares the delta Parameter: counted once, saved once.
            if (targets.Any(t => t.ModuleName == spec.OutputEmbeddings))
                throw Refuse($"the tied '{spec.OutputEmbeddings}' also carries a LoRA adapter from target_modules");
            if (cfg.ModulesToSave?.Any(e => spec.OutputEmbeddings.EndsWith(e, StringComparison.Ordinal)) == true)
                throw Refuse($"the tied '{spec.OutputEmbeddings}' is also copied by modules_to_save");
        }
        else if (!spec.TieWordEmbeddings && cfg.EnsureWeightTying)
        {
            warnings.Add("ensure_weight_tying=True but the model does not have tied weights (tie_word_embeddings=False). Weight tying will not be applied for trainable_token_indices.");
        }
    }

    private static PeftConfigException Refuse(string why) =>
        new($"trainable_token_indices on {why} is not supported: MoeLora cannot plan it yet");
}
