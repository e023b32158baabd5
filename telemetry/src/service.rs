//! The gRPC front end of device telemetry: any node answers for any device (the runtime routes
//! the query to the node hosting the device's shard).

use kafka_sharding::owners::with_route;
use kafka_sharding::Entities;
use tonic::{Request, Response, Status};

use crate::pb::device_telemetry_server::{DeviceTelemetry, DeviceTelemetryServer};
use crate::pb::{DeviceStatsReply, DeviceStatsRequest};
use crate::{Devices, Window};

pub struct DeviceTelemetryService {
    devices: Entities<Devices>,
}

impl DeviceTelemetryService {
    /// The tonic server to mount on the node.
    pub fn server(devices: Entities<Devices>) -> DeviceTelemetryServer<Self> {
        DeviceTelemetryServer::new(Self { devices })
    }
}

#[tonic::async_trait]
impl DeviceTelemetry for DeviceTelemetryService {
    async fn device_stats(
        &self,
        request: Request<DeviceStatsRequest>,
    ) -> Result<Response<DeviceStatsReply>, Status> {
        let request = request.into_inner();
        let window = Window {
            last: request.last,
            above_milli: request.above_milli,
        };
        window.span().map_err(Status::invalid_argument)?;
        let (mut reply, route) = self
            .devices
            .ask(&request.device_id, window)
            .await
            .map_err(|e| e.to_status("device id"))?;
        reply.device_id = request.device_id;
        Ok(with_route(Response::new(reply), route))
    }
}
