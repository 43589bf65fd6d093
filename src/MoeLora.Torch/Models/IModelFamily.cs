using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models;

/// <summary>One architecture family (one file each under Families/).</summary>
internal interface IModelFamily
{
    string ModelType { get; }
    CausalLm Build(ModelConfig config, Init init);
    /// <summary>Substring renames from on-disk (Hub) names to runtime names, applied before expert fusing.</summary>
    IEnumerable<(string From, string To)> HubRenames => [];
}
